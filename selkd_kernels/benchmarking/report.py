"""Result files (JSON, CSV, PNG) and the console comparison table."""
from __future__ import annotations

import csv
import importlib.util
import json
import math
from collections import OrderedDict
from pathlib import Path

CSV_FIELDS = ("op", "workload", "kind", "sweep", "sweep_param", "sweep_value", "provider", "family",
              "status", "B", "m", "n", "eps", "n_iters", "tau", "device", "dtype", "quick",
              "time_ms_median", "time_ms_q1", "time_ms_q3", "time_ms_iqr", "time_ms_min",
              "time_ms_mean", "repeats", "number", "first_call_s", "peak_mem_mb", "mem_method",
              "speedup_vs_plain", "speedup_vs_pot", "value", "ref_value", "abs_diff_vs_ref",
              "agrees_with_ref", "note")


def _ok_time(row) -> float | None:
    t = row.get("time_ms_median")
    if row.get("status") == "ok" and t is not None and math.isfinite(t) and t > 0:
        return t
    return None


def group_key(row) -> tuple:
    return (row["op"], row["workload"], row.get("sweep"))


def add_speedups(rows: list[dict], enabled: bool = True) -> None:
    """Speed-up of each provider against the fastest plain-PyTorch loop and the fastest POT call of
    the same (op, problem): ratio > 1 means faster than that baseline. ``enabled=False`` (quick
    runs, whose single cold calls support no comparison) leaves them empty."""
    if not enabled:
        for r in rows:
            r["speedup_vs_plain"] = r["speedup_vs_pot"] = None
        return
    groups: dict = OrderedDict()
    for r in rows:
        groups.setdefault(group_key(r), []).append(r)
    for members in groups.values():
        best = {}
        for fam in ("plain", "pot"):
            times = [_ok_time(r) for r in members if r["family"] == fam]
            times = [t for t in times if t is not None]
            best[fam] = min(times) if times else None
        for r in members:
            t = _ok_time(r)
            r["speedup_vs_plain"] = (best["plain"] / t) if (t and best["plain"]) else None
            r["speedup_vs_pot"] = (best["pot"] / t) if (t and best["pot"]) else None


def write_json(path: Path, meta: dict, rows: list[dict]) -> None:
    with open(path, "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1, default=str)


def write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        wr.writeheader()
        for r in rows:
            wr.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})


# ----------------------------------------------------------------------------- plots

PLOTTING_MISSING = ("matplotlib is not installed, so no plots (pip install matplotlib, or "
                    "pip install \"selkd-kernels[bench]\")")


def plotting_available() -> bool:
    """Whether the plots can be drawn (matplotlib is an optional dependency, extra [bench])."""
    return importlib.util.find_spec("matplotlib") is not None


def _plt():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(PLOTTING_MISSING) from exc
    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    return plt


def _title_suffix(meta) -> str:
    m = meta.get("machine", {})
    s = f"{meta.get('device', '')}, {m.get('cpu_model', '')}"
    if m.get("gpu"):
        s = f"{m['gpu']}"
    if meta.get("quick"):
        s += " | QUICK SMOKE RUN: cold single calls, not a measurement"
    return s


def plot_workloads(out_dir: Path, meta: dict, rows: list[dict]) -> list[Path]:
    """One horizontal bar chart per op: median time per provider and workload (log scale), with
    the interquartile range as the error bar."""
    plt = _plt()
    files = []
    by_op: dict = OrderedDict()
    for r in rows:
        if r.get("sweep") is None and _ok_time(r) is not None:
            by_op.setdefault(r["op"], []).append(r)
    for op, rs in by_op.items():
        workloads = list(OrderedDict.fromkeys(r["workload"] for r in rs))
        provs = list(OrderedDict.fromkeys(r["provider"] for r in rs))
        fig, ax = plt.subplots(figsize=(9, 1.2 + 0.35 * len(workloads) * len(provs)))
        height = 0.8 / max(1, len(provs))
        for j, prov in enumerate(provs):
            ys, xs, lo, hi = [], [], [], []
            for i, wl in enumerate(workloads):
                hit = [r for r in rs if r["workload"] == wl and r["provider"] == prov]
                if not hit:
                    continue
                r = hit[0]
                ys.append(i + j * height)
                xs.append(r["time_ms_median"])
                lo.append(max(0.0, r["time_ms_median"] - (r.get("time_ms_q1") or r["time_ms_median"])))
                hi.append(max(0.0, (r.get("time_ms_q3") or r["time_ms_median"]) - r["time_ms_median"]))
            ax.barh(ys, xs, height=height, xerr=[lo, hi], label=prov, capsize=2)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(workloads))])
        ax.set_yticklabels(workloads)
        ax.set_xscale("log")
        ax.set_xlabel("time per call [ms] (median, IQR bars; log scale)")
        ax.set_title(f"{op}\n{_title_suffix(meta)}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out_dir / f"workloads_{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


def plot_sweeps(out_dir: Path, meta: dict, rows: list[dict], labels: dict) -> list[Path]:
    """Time against the swept parameter, one line per provider, log-log."""
    plt = _plt()
    files = []
    groups: dict = OrderedDict()
    for r in rows:
        if r.get("sweep") is not None:
            groups.setdefault((r["sweep"], r["op"]), []).append(r)
    for (sweep, op), rs in groups.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for prov in OrderedDict.fromkeys(r["provider"] for r in rs):
            pts = sorted((r["sweep_value"], r) for r in rs
                         if r["provider"] == prov and _ok_time(r) is not None)
            if not pts:
                continue
            xs = [p[0] for p in pts]
            ys = [p[1]["time_ms_median"] for p in pts]
            lo = [y - (p[1].get("time_ms_q1") or y) for y, p in zip(ys, pts)]
            hi = [(p[1].get("time_ms_q3") or y) - y for y, p in zip(ys, pts)]
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=3, capsize=2, label=prov)
        ax.set_xscale("log")
        ax.set_yscale("log")
        xs_all = sorted({r["sweep_value"] for r in rs})
        ax.set_xticks(xs_all)
        ax.set_xticklabels([f"{x:g}" for x in xs_all])
        ax.minorticks_off()
        ax.set_xlabel(labels.get(sweep, sweep))
        ax.set_ylabel("time per call [ms] (median, IQR bars)")
        ax.set_title(f"{op}: sweep over {labels.get(sweep, sweep)}\n{_title_suffix(meta)}",
                     fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = out_dir / f"sweep_{sweep}_{op}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files


# ----------------------------------------------------------------------------- table

def _fmt(x, spec, missing="-"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return missing
    return format(x, spec)


def format_table(rows: list[dict], quick: bool = False) -> str:
    lines = []
    if quick:
        lines.append("QUICK RUN: every provider called once on small problems; times are single "
                     "cold calls and are not measurements.")
    groups: dict = OrderedDict()
    for r in rows:
        groups.setdefault(group_key(r), []).append(r)
    head = (f"  {'provider':24s} {'status':11s} {'median ms':>10s} {'IQR ms':>9s} "
            f"{'peak MB':>8s} {'x plain':>8s} {'x POT':>8s} {'|diff| vs ref':>13s}  note")
    for (op, wl, _), members in groups.items():
        r0 = members[0]
        shape = (f"m={r0['B']} k={r0['n']}" if r0["kind"] == "open-set"
                 else f"B={r0['B']} {r0['m']}x{r0['n']}")
        lines.append("")
        lines.append(f"== {op} | {wl} | {shape} eps={r0['eps']:g} iters={r0['n_iters']} "
                     f"| {r0['device']} {r0['dtype']}")
        lines.append(head)
        for r in members:
            diff = _fmt(r.get("abs_diff_vs_ref"), ".1e")
            if r.get("agrees_with_ref") is False:
                diff += " !"
            lines.append(
                f"  {r['provider']:24s} {r['status']:11s} {_fmt(_ok_time(r), '10.3f'):>10s} "
                f"{_fmt(r.get('time_ms_iqr') if _ok_time(r) else None, '9.3f'):>9s} "
                f"{_fmt(r.get('peak_mem_mb'), '8.1f'):>8s} "
                f"{_fmt(r.get('speedup_vs_plain'), '7.2f') + ('x' if r.get('speedup_vs_plain') else ''):>8s} "
                f"{_fmt(r.get('speedup_vs_pot'), '7.2f') + ('x' if r.get('speedup_vs_pot') else ''):>8s} "
                f"{diff:>13s}  {r.get('note', '')}")
    lines.append("")
    lines.append("x plain / x POT: fastest plain-PyTorch loop (resp. POT call) time divided by this "
                 "provider's time, same problem; > 1 is faster. '!' marks a value that disagrees "
                 "with the reference.")
    return "\n".join(lines)
