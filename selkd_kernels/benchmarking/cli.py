"""``selkd bench``: time every implementation of the package's ops against the pure-PyTorch
reference (eager and compiled), plain PyTorch loops and POT, on the workloads of docs/benchmarks.md.
``selkd bench --help`` lists every option with its default, and examples.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from ..apps.training import progress
from . import environment, report
from .providers import ALL_OPS, providers_for
from .runner import (
    AGREEMENT_RTOL,
    RunConfig,
    Runner,
    points_for_sweep,
    points_for_workloads,
)
from .workloads import (
    DEFAULT_WORKLOADS,
    QUICK_DEFAULT_WORKLOADS,
    SWEEPS,
    WORKLOADS,
    resolve_workloads,
)

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _split(values):
    """Accept both ``--x a b`` and ``--x a,b``."""
    out = []
    for v in values or []:
        out.extend(s for s in v.split(",") if s)
    return out


EXAMPLES = """examples:
  selkd bench --quick --out /tmp/bench            # CI smoke run: every provider once, < 60 s
  selkd bench --workloads cifar sharp --out results
  selkd bench --workloads none --sweep batch classes --ops sinkhorn --out results
  selkd bench --providers selkd 'reference:*' plain:scaling pot:batch --repeats 30
  selkd bench --list                              # workloads, sweeps, ops, providers here

Results: results.json, results.csv and PNG plots (with matplotlib) in --out, a comparison table
on stdout. Exit status 1 when a provider raised an error or disagreed with the reference.
POT providers report "unavailable" without POT; `pip install "selkd-kernels[bench]"` has all.
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown after every help text that has one (an unset option's help says what
    unset means; a switch's default is off); the description and examples kept as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="selkd bench", formatter_class=_HelpFormatter, epilog=EXAMPLES,
        description="Benchmark the package's Sinkhorn, KD-loss, partial-OT and assessment\n"
                    "implementations against the PyTorch reference, plain PyTorch and POT.")
    p.add_argument("--workloads", nargs="+", metavar="NAME", default=None,
                   help=f"workloads to run: {', '.join(WORKLOADS)}, 'all' or 'none' "
                        f"(unset: all, or none when --sweep is given)")
    p.add_argument("--sweep", nargs="+", metavar="NAME", default=None,
                   help=f"parameter sweeps around 'cifar': {', '.join(SWEEPS)} or 'all'")
    p.add_argument("--ops", nargs="+", metavar="OP", default=None,
                   help=f"ops to time (unset: all that apply): {', '.join(ALL_OPS)}")
    p.add_argument("--providers", nargs="+", metavar="NAME", default=None,
                   help="provider names or families to keep, e.g. 'selkd reference:compiled "
                        "plain pot:batch'; 'reference' is the eager reference alone, "
                        "'reference:*' its whole family (unset: all)")
    p.add_argument("--repeats", type=int, default=15, help="timed samples per provider")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls first (the first compiles; the last measures memory)")
    p.add_argument("--budget", type=float, default=60.0,
                   help="seconds of timed samples per provider and problem; slower providers "
                        "get fewer repeats, and one cold call above twice this is not repeated")
    p.add_argument("--max-call-s", type=float, default=60.0,
                   help="on large problems, skip a provider whose single call would take longer "
                        "(estimated from a 2-iteration probe)")
    p.add_argument("--mem-cap-gb", type=float, default=8.0,
                   help="skip providers whose (B,m,n) temporaries would exceed this")
    p.add_argument("--device", default=None,
                   help="cpu or cuda[:i] (unset: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                   help="floating-point type of every input")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (unset: torch's choice). On a machine shared "
                        "with other jobs, 1 avoids OpenMP threads waiting on descheduled peers")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated inputs")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for results.json, results.csv and plots (unset: table only)")
    p.add_argument("--quick", action="store_true",
                   help="every provider once on small problems (CI smoke run; no timing claims)")
    p.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--list", action="store_true",
                   help="list workloads, sweeps, ops and providers available here, then exit")
    return p


def _list(device) -> str:
    lines = ["workloads:"]
    for w in WORKLOADS.values():
        lines.append(f"  {w.name:13s} {w.kind:10s} {w.shape_label():22s} eps={w.eps:g} "
                     f"iters={w.n_iters}  {w.description}")
    lines.append("sweeps (around 'cifar'):")
    for s in SWEEPS.values():
        lines.append(f"  {s.name:8s} {s.label}: {', '.join(str(v) for v in s.values)}")
    lines.append(f"providers on {device}:")
    for op in ALL_OPS:
        lines.append(f"  {op}:")
        for prov in providers_for(op, device):
            state = prov.unavailable and f"unavailable ({prov.unavailable})" or \
                prov.untimed and f"not timed ({prov.untimed})" or "available"
            lines.append(f"    {prov.name:26s} {state}")
    return "\n".join(lines)


def _resolve(args, parser):
    workloads = _split(args.workloads)
    sweeps = _split(args.sweep)
    if sweeps == ["all"]:
        sweeps = list(SWEEPS)
    for s in sweeps:
        if s not in SWEEPS:
            parser.error(f"--sweep: unknown sweep {s!r}; choose from {', '.join(SWEEPS)}")
    if not workloads:
        if args.quick:
            workloads = list(QUICK_DEFAULT_WORKLOADS)
        else:
            workloads = [] if sweeps else list(DEFAULT_WORKLOADS)
    elif workloads == ["all"]:
        workloads = list(DEFAULT_WORKLOADS)
    elif workloads == ["none"]:
        workloads = []
    for w in workloads:
        if w not in WORKLOADS:
            parser.error(f"--workloads: unknown workload {w!r}; choose from "
                         f"{', '.join(WORKLOADS)}, all, none")
    ops = _split(args.ops) or list(ALL_OPS)
    for op in ops:
        if op not in ALL_OPS:
            parser.error(f"--ops: unknown op {op!r}; choose from {', '.join(ALL_OPS)}")
    if args.repeats < 1 or args.warmup < 1:
        parser.error("--repeats and --warmup must be >= 1")
    return workloads, sweeps, ops


def _device(args):
    """The device to run on, or an error message."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        return None, "--device cuda requested but CUDA is not available"
    if args.threads is not None and args.threads < 1:
        return None, "--threads must be >= 1"
    return device, None


def _config(args, device) -> RunConfig:
    return RunConfig(device=device, dtype=_DTYPES[args.dtype],
                     repeats=1 if args.quick else args.repeats,
                     warmup=1 if args.quick else args.warmup, budget_s=args.budget,
                     mem_cap_bytes=args.mem_cap_gb * 2 ** 30, quick=args.quick, seed=args.seed,
                     max_call_s=args.max_call_s,
                     measure_memory=not (args.no_memory or args.quick),
                     providers=_split(args.providers) or None)


def _points(args, workloads, sweeps) -> list:
    points = points_for_workloads(resolve_workloads(workloads, quick=args.quick))
    for s in sweeps:
        points += points_for_sweep(SWEEPS[s], quick=args.quick)
    if args.quick and args.sweep is None:
        # two batch sizes of the solve alone: exercises the sweep path and its plot cheaply
        points += points_for_sweep(SWEEPS["batch"], quick=True, ops=("sinkhorn",))
    return points


def _metadata(args, argv, device, cfg) -> dict:
    meta = environment.collect(device)
    meta.update(quick=args.quick, argv=list(argv) if argv is not None else sys.argv[1:],
                repeats=cfg.repeats, warmup=cfg.warmup, budget_s=cfg.budget_s,
                max_call_s=cfg.max_call_s, mem_cap_gb=args.mem_cap_gb,
                dtype=args.dtype, seed=args.seed, agreement_rtol=AGREEMENT_RTOL,
                timing="CUDA events + synchronize" if device.type == "cuda"
                else "time.perf_counter around synchronous calls",
                statistics="median and interquartile range over samples; a sample is the mean "
                           "of `number` back-to-back calls; warm-up calls excluded")
    return meta


def _run(args, cfg, ops, points) -> tuple[list, float]:
    """All result rows, and the wall time they took."""
    runner = Runner(cfg)
    total = sum(len(provs) for _, _, provs in runner.tasks(ops, points))
    runner.progress = progress(None, enabled=not (args.no_progress or args.quick),
                               desc="selkd bench", total=total)
    t0 = time.perf_counter()
    try:
        rows = runner.run(ops, points)
    finally:
        if runner.progress is not None:
            runner.progress.close()
    return rows, round(time.perf_counter() - t0, 2)


def _write_outputs(out: Path, meta, rows, plots: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(out / "results.json", meta, rows)
    report.write_csv(out / "results.csv", rows)
    files = []
    if plots:
        files = report.plot_workloads(out, meta, rows)
        files += report.plot_sweeps(out, meta, rows, {s.name: s.label for s in SWEEPS.values()})
    print(f"\nwrote {out / 'results.json'}, {out / 'results.csv'} and {len(files)} plot(s) "
          f"to {out}")


def _exit_status(rows) -> int:
    errors = [r for r in rows if r["status"] == "error"]
    wrong = [r for r in rows if r.get("agrees_with_ref") is False]
    for r in errors:
        print(f"ERROR {r['op']} {r['workload']} {r['provider']}: {r['note']}", file=sys.stderr)
    for r in wrong:
        print(f"DISAGREES {r['op']} {r['workload']} {r['provider']}: value {r['value']:.6g} vs "
              f"reference {r['ref_value']:.6g}", file=sys.stderr)
    return 1 if errors or wrong else 0


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
        device, problem = _device(args)
        if problem:
            parser.error(problem)
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.list:
            print(_list(device))
            return 0
        workloads, sweeps, ops = _resolve(args, parser)
    except SystemExit as exc:  # --help or a usage error: hand the status back to the caller
        return int(exc.code or 0)
    # checked before hours of timing, not when the report is written
    plots = args.out is not None and report.plotting_available()
    if args.out is not None and not plots:
        print(f"selkd bench: {report.PLOTTING_MISSING}; results.json and results.csv are still "
              f"written", file=sys.stderr)

    cfg = _config(args, device)
    points = _points(args, workloads, sweeps)
    meta = _metadata(args, argv, device, cfg)
    rows, meta["wall_s"] = _run(args, cfg, ops, points)
    report.add_speedups(rows, enabled=not args.quick)
    print(report.format_table(rows, quick=args.quick))
    if args.out is not None:
        _write_outputs(args.out, meta, rows, plots)
    return _exit_status(rows)


if __name__ == "__main__":
    sys.exit(main())
