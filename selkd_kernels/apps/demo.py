r"""``selkd demo``: teacher assessment and cross-task distillation, end to end (paper 1, Sec. 6),
on protocol v2 (docs/assessment.md).

For each dataset and protocol seed:

1. build (or load from the cache) the model zoo of :mod:`selkd_kernels.apps.zoo`: several
   teacher families on every class window of the double sliding-window protocol;
2. ground truth: for every target task and teacher, students distilled on labelled shots plus an
   unlabelled pool, the distillation weight chosen on validation
   (:mod:`selkd_kernels.apps.students`);
3. every metric on every teacher: our transport scores (paper's S_eps, transport cost,
   debiased divergence; fixed or cross-validated probe; Approximation I; exact Eq. 24) and the
   baselines (NCE, LEEP, NLEEP, LogME exact and as its reference code computes it, H-score with
   and without shrinkage, SFDA, PARC, TransRate), plus a sensitivity sweep;
4. distil or not: the default metric picks a teacher, a permutation test on its score decides
   whether to distil, the weight comes from validation; the student is compared with the
   no-teacher student.

Then, over tasks x seeds, with bootstrap intervals (:mod:`selkd_kernels.apps.report`): ranking
quality of every metric (Pearson, Kendall, weighted Kendall in scipy's default and in a
ground-truth-weighted form, top-1 regret), paired differences between metrics, an overlap-oracle
row, correlations within each overlap level, split-half reliability of the ground truth,
Fig. 5-style gains per overlap, Tab. 9-style NMI, time per teacher.

Sign convention: our scores are distances (lower is better), the baselines higher-better. Every
correlation and regret uses the oriented score (ours negated, paper 1's ``Q = -M``), so +1 means
"ranks the teachers like the students' accuracy" for every metric.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import warnings
from typing import List, Optional

import torch

from .datasets import DATASETS
from .evaluation import BASELINES, ORACLE, OURS, PAPER, evaluate_zoo, nmi_rows
from .report import best_of_ours, summarise
from .students import all_ground_truth
from .training import progress as _bar
from .zoo import ZooConfig, build_zoo, save_zoo

DEFAULT_METRIC = "Ours: divergence, fixed probe"
DEFAULT_DATASETS = ("synthetic", "digits")
EXTRAS = {"sklearn": "scikit-learn", "scipy": "scipy", "matplotlib": "matplotlib"}


def _timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def run_seed(cfg: ZooConfig, cache_dir, progress: bool, use_cache: bool = True,
             sweep: bool = True) -> dict:
    """Zoo, ground truth and every metric for one dataset and seed (plain data only, so it can
    come back from a worker process)."""
    zoo, build_s, _ = _timed(lambda: build_zoo(cfg, cache_dir=cache_dir, progress=progress,
                                               use_cache=use_cache))
    all_ground_truth(zoo, progress)
    if use_cache:
        save_zoo(zoo, cache_dir)
    units = evaluate_zoo(zoo, DEFAULT_METRIC, progress, sweep)
    nmi = nmi_rows(zoo) if zoo.data.superclass is not None else []
    teachers = [{k: t[k] for k in ("name", "family", "window", "classes", "test_acc", "entropy")}
                for t in zoo.teachers]
    return {"units": units, "nmi": nmi, "build_seconds": build_s, "teachers": teachers}


def _run_job(args, progress: bool) -> dict:
    """One (dataset, seed) job of :func:`run_jobs`, timed, in this process."""
    dataset, seed, quick, cache_dir, use_cache, sweep, overrides, _ = args
    cfg = ZooConfig.preset(dataset, quick=quick, seed=seed, **(overrides or {}))
    (out, wall, cpu) = _timed(lambda: run_seed(cfg, cache_dir, progress, use_cache, sweep))
    return {**out, "dataset": dataset, "seed": seed, "wall_seconds": wall, "cpu_seconds": cpu}


def _job(args) -> dict:
    """One (dataset, seed) in a worker: single-threaded, like the main process."""
    threads = args[-1]
    torch.set_num_threads(threads)
    blas = _blas_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*backend .* unavailable.*")
            return _run_job(args, False)
    finally:
        if blas is not None:
            blas.restore_original_limits()


def run_jobs(jobs_args: List[tuple], jobs: int, progress: bool) -> List[dict]:
    """Every (dataset, seed) job, in ``jobs`` worker processes (1: in this process, with the
    detailed progress bars)."""
    if jobs <= 1:
        return [_run_job(a, progress) for a in jobs_args]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        return list(_bar(pool.map(_job, jobs_args), progress, "zoos (dataset x seed)",
                         len(jobs_args)))


def run_dataset(dataset: str, seeds: List[int], quick: bool, cache_dir, progress: bool,
                boot: int, use_cache: bool = True, overrides: Optional[dict] = None,
                jobs: int = 1, threads: int = 1, seed_results: Optional[List[dict]] = None
                ) -> dict:
    """Every seed of one dataset (or their ``seed_results`` from :func:`run_jobs`), then the
    summary over tasks x seeds. ``overrides`` go to :meth:`ZooConfig.preset`."""
    if seed_results is None:
        seed_results = run_jobs([(dataset, s, quick, cache_dir, use_cache, s == seeds[0],
                                  overrides, threads) for s in seeds], jobs, progress)
    units = [u for r in seed_results for u in r["units"]]
    nmi = [row for r in seed_results for row in r["nmi"]]
    summary = summarise(units, nmi or None, DEFAULT_METRIC, boot)
    summary["best_of_ours_by_kendall"] = best_of_ours(units, boot, ranking=summary["ranking"])
    cfg = ZooConfig.preset(dataset, quick=quick, **(overrides or {}))
    return {"dataset": dataset, "seeds": list(seeds),
            "config": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in cfg.__dict__.items() if k != "seed"},
            "teachers_per_seed": {r["seed"]: r["teachers"] for r in seed_results},
            "default_metric": DEFAULT_METRIC,
            "seconds_per_seed": {r["seed"]: {"wall": r["wall_seconds"], "cpu": r["cpu_seconds"],
                                             "zoo_build_wall": r["build_seconds"]}
                                 for r in seed_results},
            "units": units, "nmi_rows": nmi, "summary": summary}


# ------------------------------------------------------------------------------------ text

def _ci(b, pct=False, digits=3):
    if b["mean"] is None:
        return "-"
    f = (lambda x: f"{100 * x:.{max(digits - 2, 1)}f}") if pct else (lambda x: f"{x:.{digits}f}")
    return f"{f(b['mean'])} [{f(b['ci'][0])}, {f(b['ci'][1])}]"


def format_ranking(res) -> str:
    s = res["summary"]["ranking"]
    head = (f"Ranking quality vs the distilled students' accuracy, {res['dataset']}: mean over "
            f"{res['summary']['units']} tasks x seeds [95% bootstrap CI]; ours as -score")
    lines = [head, f"{'metric':42s} {'Pearson':>22s} {'Kendall':>22s} {'wKendall (scipy)':>22s} "
                   f"{'wKendall (GT-rank)':>22s} {'top-1 regret %':>20s}"]
    for m, q in s.items():
        lines.append(f"{m:42s} {_ci(q['pearson']):>22s} {_ci(q['kendall']):>22s} "
                     f"{_ci(q['weighted_kendall']):>22s} {_ci(q['weighted_kendall_gt']):>22s} "
                     f"{_ci(q['top1_regret'], pct=True):>20s}")
    return "\n".join(lines)


def format_paired(res) -> str:
    p = res["summary"]["paired_default_minus"]
    lines = [f"Paired: {res['default_metric']} minus each metric, Kendall (P(diff > 0))"]
    for m, q in p.items():
        k = q["kendall"]
        lines.append(f"  {m:42s} {_ci(k):>24s}  P={k['p_above_0']:.2f}" if k["mean"] is not None
                     else f"  {m:42s} -")
    return "\n".join(lines)


def format_other(res) -> str:
    s = res["summary"]
    out = [f"Fig. 5: student accuracy % per overlap ({res['dataset']}), [95% CI]",
           f"{'overlap':>8s} {'no teacher':>22s} " + " ".join(
               f"{f:>22s}" for f in s["fig5"][next(iter(s["fig5"]))] if f != "no_teacher")]
    for g, row in s["fig5"].items():
        out.append(f"{float(g) * 100:7.0f}% {_ci(row['no_teacher'], True):>22s} " + " ".join(
            f"{_ci(v['distilled'], True):>22s}" for k, v in row.items() if k != "no_teacher"))
    sh = s["split_half"]
    out.append(f"Ground-truth split-half reliability: r = {_ci(sh['half_vs_half'])}, "
               f"Spearman-Brown {_ci(sh['spearman_brown'])}")
    out.append(f"Distillation weight chosen on validation: {s['lambda_counts']}")
    if s["nmi"]:
        out.append("Tab. 9: NMI of k-means on target class centres vs super-classes")
        for g, r in s["nmi"].items():
            out.append(f"  overlap {float(g) * 100:3.0f}%: random {_ci(r['random'], digits=2)}, "
                       f"teacher {_ci(r['teacher'], digits=2)}")
    d = s["distil_or_not"]
    out.append(f"Distil or not (gain over the no-teacher student, % points; distilled in "
               f"{100 * d['distilled_share']:.0f}% of tasks by the permutation gate):")
    for k, v in d["gain_over_no_teacher"].items():
        out.append(f"  {k:18s} {_ci(v, True)}")
    out.append("Time per teacher (s): " + ", ".join(
        f"{k}: {v:.4f}" for k, v in s["seconds_per_teacher"].items()))
    return "\n".join(out)


# ----------------------------------------------------------------------------------- plots

def _plot_fig5(res, plt, out_dir) -> str:
    f5 = res["summary"]["fig5"]
    g = [float(k) * 100 for k in f5]
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    nt = [f5[k]["no_teacher"] for k in f5]
    ax.errorbar(g, [100 * b["mean"] for b in nt], yerr=_yerr(nt), fmt="s--", color="k",
                label="no teacher", capsize=3)
    for fam in [k for k in f5[next(iter(f5))] if k not in ("no_teacher", "all")]:
        vals = [f5[k][fam]["distilled"] for k in f5]
        ax.errorbar(g, [100 * b["mean"] for b in vals], yerr=_yerr(vals), fmt="o-", capsize=3,
                    label=f"Sinkhorn KD from {fam}")
    ax.invert_xaxis()
    ax.set_xlabel("class overlap ratio g (%)")
    ax.set_ylabel("student test accuracy (%)")
    ax.set_title(f"{res['dataset']}: {res['summary']['units']} tasks x seeds, 95% CI")
    return _save(fig, ax, plt, out_dir, f"fig5_accuracy_vs_overlap_{res['dataset']}.png")


def _yerr(bs):
    return [[100 * (b["mean"] - b["ci"][0]) for b in bs], [100 * (b["ci"][1] - b["mean"])
                                                           for b in bs]]


def _plot_ranking(res, plt, out_dir) -> str:
    s = res["summary"]["ranking"]
    names = list(s)
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(names) + 1.2))
    for j, meas in enumerate(("pearson", "kendall", "weighted_kendall")):
        vals = [s[m][meas] for m in names]
        y = [i + 0.25 * (j - 1) for i in range(len(names))]
        ax.errorbar([b["mean"] if b["mean"] is not None else float("nan") for b in vals], y,
                    xerr=[[(b["mean"] - b["ci"][0]) if b["mean"] is not None else 0
                           for b in vals], [(b["ci"][1] - b["mean"]) if b["mean"] is not None
                                            else 0 for b in vals]],
                    fmt="o", capsize=2, label=meas, markersize=3)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.axvline(0, color="grey", lw=0.5)
    ax.invert_yaxis()
    ax.set_xlabel("correlation with distilled-student accuracy (95% CI)")
    return _save(fig, ax, plt, out_dir, f"ranking_quality_{res['dataset']}.png")


def _save(fig, ax, plt, out_dir, name) -> str:
    ax.legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, name)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p


def plots(res, out_dir) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return [_plot_fig5(res, plt, out_dir), _plot_ranking(res, plt, out_dir)]


# ------------------------------------------------------------------------------------- CLI

def check_extras() -> None:
    """The demo needs scikit-learn, scipy and matplotlib: say so before any work starts."""
    missing = [pkg for mod, pkg in EXTRAS.items() if importlib.util.find_spec(mod) is None]
    if missing:
        raise SystemExit(f"selkd demo needs {', '.join(missing)}: pip install "
                         f"selkd-kernels[demo]")


def _parser():
    ap = argparse.ArgumentParser(
        prog="selkd demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Teacher assessment and cross-task distillation, end to end (paper 1, "
                    "Sec. 6): build a model zoo, distil students from every teacher, score "
                    "every teacher with our metrics and the baselines, report ranking quality "
                    "with bootstrap intervals.",
        epilog="examples:\n  selkd demo --quick\n  selkd demo --out results/demo\n"
               "  selkd demo --dataset mnist-digits --seeds 2   (needs selkd-kernels[real])")
    ap.add_argument("--quick", action="store_true",
                    help="small run: synthetic data, 2 seeds x 2 tasks, 3 teacher families, 2 "
                         "weights, no sensitivity sweep")
    ap.add_argument("--dataset", choices=(*DATASETS, "default", "all"), default="default",
                    help="'default' = synthetic (protocol v2) and digits (unrelated-classes "
                         "control); 'all' adds mnist-digits")
    ap.add_argument("--seeds", type=int, default=None,
                    help="protocol seeds 0..N-1 per dataset (default: 3, or 2 with --quick)")
    ap.add_argument("--out", default=None, help="directory for report.json and PNG plots")
    ap.add_argument("--cache", default=None, help="zoo cache directory (None: ~/.cache/selkd)")
    ap.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    ap.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws per interval")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and BLAS threads (the models are tiny: on a busy machine extra "
                         "threads cost far more than they give)")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                    help="worker processes, one (dataset, seed) zoo each")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return ap


def _children_cpu() -> float:
    """CPU seconds of the finished worker processes (user + system)."""
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _blas_threads(n):
    """Limit numpy's BLAS to ``n`` threads for the run (a 100 x 256 SVD took 1.2 s with two
    OpenBLAS threads on a loaded 2-core machine, 0.012 s with one)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=n, user_api="blas")


def _datasets(args) -> List[str]:
    if args.dataset == "default":
        return ["synthetic"] if args.quick else list(DEFAULT_DATASETS)
    return list(DATASETS) if args.dataset == "all" else [args.dataset]


def _print(res):
    print(format_ranking(res), "", format_paired(res), "", format_other(res), "", sep="\n")


def _write(report, results, out):
    os.makedirs(out, exist_ok=True)
    paths = []
    for res in results:
        paths += plots(res, out)
    report["plots"] = [os.path.basename(p) for p in paths]
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(f"wrote {os.path.join(out, 'report.json')} and {len(paths)} plot(s)")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if min(args.threads, args.bootstrap, args.jobs, args.seeds or 1) < 1:
        raise SystemExit("selkd demo: --threads, --jobs, --bootstrap and --seeds must be >= 1")
    check_extras()
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    old = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    blas = _blas_threads(args.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    results = []
    try:
        with warnings.catch_warnings():
            # the compiled backend may be absent; "auto" falls back to the reference quietly
            warnings.filterwarnings("ignore", message=".*backend .* unavailable.*")
            # the sensitivity sweep runs on the first seed of a full run only
            todo = [(ds, s, args.quick, args.cache, not args.no_cache,
                     s == seeds[0] and not args.quick, None, args.threads)
                    for ds in _datasets(args) for s in seeds]
            done = run_jobs(todo, args.jobs, not args.no_progress)
            for ds in _datasets(args):
                res = run_dataset(ds, seeds, args.quick, args.cache, False, args.bootstrap,
                                  seed_results=[r for r in done if r["dataset"] == ds])
                results.append(res)
                _print(res)
    finally:
        torch.set_num_threads(old)
        if blas is not None:
            blas.restore_original_limits()
    report = {"sign_convention": "Our scores are lower-better distances; every baseline is "
                                 "higher-better. Correlations and regrets use the oriented score "
                                 "(ours negated), so +1 is a perfect ranking for every metric.",
              "metrics": {"ours": list(OURS), "paper": PAPER, "baselines": list(BASELINES),
                          "oracle": ORACLE, "default": DEFAULT_METRIC},
              "quick": bool(args.quick), "threads": args.threads, "jobs": args.jobs,
              "wall_seconds": time.perf_counter() - t0,
              "cpu_seconds": time.process_time() - c0 + _children_cpu(),
              "datasets": results}
    print(f"selkd demo finished in {report['wall_seconds']:.1f} s wall, "
          f"{report['cpu_seconds']:.1f} s CPU (this process and its workers)")
    if args.out:
        _write(report, results, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
