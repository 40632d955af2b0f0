r"""Figures with confidence intervals from the per-teacher values of
:func:`selkd_kernels.apps.evaluation.evaluate_zoo` (docs/assessment.md).

A *unit* is one target task of one protocol seed. Every interval is a percentile bootstrap over
units (resampled with replacement, ``boot`` draws from a fixed seed), so every figure can be
recomputed from the units stored in ``report.json``: the point estimate is the mean over units
of a per-unit value, the interval that of the resampled means. Paired comparisons resample the
per-unit *difference* between two metrics, so the task-to-task variation they share cancels.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from ..assessment.ranking import RANKING_MEASURES, kendall, pearson, ranking_quality
from .evaluation import BASELINES, HIGHER_IS_BETTER, ORACLE, OURS, PAPER, SWEEP, SWEEP_SCORES

BOOT_SEED = 12345


def bootstrap(values: Sequence[float], boot: int = 2000, seed: int = BOOT_SEED) -> dict:
    """Mean of ``values`` (NaNs dropped) with a 95% percentile-bootstrap interval and the share of
    resampled means above 0 (for differences: the bootstrap probability that the first is
    larger)."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "ci": [None, None], "n": 0, "p_above_0": None}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, v.size, size=(boot, v.size))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(v.mean()), "ci": [float(lo), float(hi)], "n": int(v.size),
            "p_above_0": float((means > 0).mean())}


def unit_quality(unit: dict) -> Dict[str, dict]:
    """Ranking quality of every metric on one unit (oriented so +1 is perfect)."""
    acc = [t["acc"] for t in unit["teachers"]]
    return {m: ranking_quality(s, acc, HIGHER_IS_BETTER[m]) for m, s in unit["scores"].items()}


def ranking_summary(units: List[dict], boot: int,
                    quality: Optional[List[Dict[str, dict]]] = None) -> dict:
    """Bootstrap of every metric's ranking quality over units (``quality``: the units'
    :func:`unit_quality`, when already computed)."""
    q = quality if quality is not None else [unit_quality(u) for u in units]
    return {m: {meas: bootstrap([qu[m][meas] for qu in q], boot) for meas in RANKING_MEASURES}
            for m in q[0]}


def paired(units: List[dict], boot: int, reference: str, others: Sequence[str],
           quality: Optional[List[Dict[str, dict]]] = None) -> dict:
    """``reference`` minus each of ``others`` per unit, for every ranking measure (for regret a
    negative difference favours ``reference``; ``quality`` as in :func:`ranking_summary`)."""
    q = quality if quality is not None else [unit_quality(u) for u in units]
    return {o: {meas: bootstrap([qu[reference][meas] - qu[o][meas] for qu in q], boot)
                for meas in RANKING_MEASURES} for o in others if o != reference}


def per_overlap(units: List[dict], boot: int, metrics: Sequence[str]) -> dict:
    """Pearson correlation among the teachers of one overlap level of one unit, averaged over
    units: does a metric rank teachers that overlap the task equally (families differing in
    capacity and calibration)? Levels with fewer than 3 teachers are skipped."""
    levels = sorted({t["overlap"] for u in units for t in u["teachers"]}, reverse=True)
    out = {}
    for g in levels:
        row = {}
        for m in metrics:
            vals = []
            for u in units:
                idx = [i for i, t in enumerate(u["teachers"]) if t["overlap"] == g]
                if len(idx) >= 3:
                    vals.append(pearson([u["scores"][m][i] for i in idx],
                                        [u["teachers"][i]["acc"] for i in idx],
                                        HIGHER_IS_BETTER[m]))
            row[m] = bootstrap(vals, boot)
        out[f"{g:.2f}"] = row
    return out


def split_half(units: List[dict], boot: int) -> dict:
    """Reliability of the ground truth: per unit, Pearson between the teachers' accuracies from
    the first and from the second half of the student seeds, and its Spearman-Brown correction
    ``2r / (1 + r)`` (the reliability of the full average)."""
    r = []
    for u in units:
        seeds = len(u["teachers"][0]["test_by_seed"])
        if seeds < 2:
            continue
        half = seeds // 2
        a = [float(np.mean(t["test_by_seed"][:half])) for t in u["teachers"]]
        b = [float(np.mean(t["test_by_seed"][half:])) for t in u["teachers"]]
        r.append(pearson(a, b))
    sb = [2 * x / (1 + x) for x in r if np.isfinite(x)]
    return {"half_vs_half": bootstrap(r, boot), "spearman_brown": bootstrap(sb, boot)}


def fig5(units: List[dict], boot: int) -> dict:
    """Paper 1, Fig. 5: per overlap level and family, the distilled students' accuracy, the
    no-teacher students' accuracy on the same units, and the paired gain."""
    levels = sorted({t["overlap"] for u in units for t in u["teachers"]}, reverse=True)
    fams = list(dict.fromkeys(t["family"] for t in units[0]["teachers"]))
    out = {}
    for g in levels:
        row = {}
        for f in fams + ["all"]:
            acc, gain = [], []
            for u in units:
                sel = [t["acc"] for t in u["teachers"]
                       if t["overlap"] == g and (f == "all" or t["family"] == f)]
                if sel:
                    acc.append(float(np.mean(sel)))
                    gain.append(float(np.mean(sel)) - u["no_teacher"]["acc"])
            row[f] = {"distilled": bootstrap(acc, boot), "gain": bootstrap(gain, boot)}
        row["no_teacher"] = bootstrap([u["no_teacher"]["acc"] for u in units], boot)
        out[f"{g:.2f}"] = row
    return out


def distil_or_not(units: List[dict], boot: int, z_threshold: float = 2.0) -> dict:
    """The final step's policies, each against the no-teacher student on the same unit:
    ``always``: distil from the teacher the default metric picks (weight chosen on validation);
    ``assessment-gated``: only when that teacher's permutation z exceeds ``z_threshold``;
    ``validation-gated``: distil only when the chosen teacher's best validation accuracy beats the
    no-teacher student's; ``oracle``: the best teacher in hindsight."""
    pol = {"always": [], "assessment-gated": [], "validation-gated": [], "oracle": []}
    decided = []
    for u in units:
        t = u["teachers"][u["chosen"]]
        base = u["no_teacher"]["acc"]
        gate = u["chosen_permutation_z"] > z_threshold
        decided.append(gate)
        pol["always"].append(t["acc"] - base)
        pol["assessment-gated"].append((t["acc"] if gate else base) - base)
        pol["validation-gated"].append(
            (t["acc"] if t["val_acc"] > u["no_teacher"]["val_acc"] else base) - base)
        pol["oracle"].append(max(tt["acc"] for tt in u["teachers"]) - base)
    return {"z_threshold": z_threshold, "distilled_share": float(np.mean(decided)),
            "no_teacher_acc": bootstrap([u["no_teacher"]["acc"] for u in units], boot),
            "gain_over_no_teacher": {k: bootstrap(v, boot) for k, v in pol.items()}}


def sensitivity(units: List[dict], boot: int) -> dict:
    """Mean Pearson and Kendall of each sweep point of our scores, with intervals (over the
    units that carry a sweep: the demo sweeps the first seed only)."""
    units = [u for u in units if u["sweep"]]
    out = {}
    for key in (units[0]["sweep"] if units else {}):
        p, k = [], []
        for u in units:
            acc = [t["acc"] for t in u["teachers"]]
            p.append(pearson(u["sweep"][key], acc, False))
            k.append(kendall(u["sweep"][key], acc, False))
        out[key] = {"pearson": bootstrap(p, boot), "kendall": bootstrap(k, boot)}
    return out


def seconds_per_teacher(units: List[dict]) -> Dict[str, float]:
    keys = units[0]["seconds"]
    return {k: float(np.mean([s for u in units for s in u["seconds"][k]])) for k in keys}


def lambda_counts(units: List[dict]) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for u in units:
        for t in u["teachers"]:
            out[str(t["lambda"])] = out.get(str(t["lambda"]), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: float(kv[0])))


def nmi_summary(rows: Optional[List[dict]], boot: int) -> Optional[dict]:
    if not rows:
        return None
    levels = sorted({r["overlap"] for r in rows}, reverse=True)
    return {f"{g:.2f}": {k: bootstrap([r[k] for r in rows if r["overlap"] == g], boot)
                         for k in ("teacher", "random")} for g in levels}


def summarise(units: List[dict], nmi: Optional[List[dict]], default_metric: str,
              boot: int = 2000) -> dict:
    """Every figure of the report for one dataset."""
    metrics = list(units[0]["scores"])
    main = [default_metric, PAPER] + [b for b in BASELINES if b in metrics] + [ORACLE]
    q = [unit_quality(u) for u in units]
    return {
        "units": len(units), "bootstrap": {"draws": boot, "seed": BOOT_SEED},
        "ranking": ranking_summary(units, boot, q),
        "paired_default_minus": paired(units, boot, default_metric, metrics, q),
        "paired_paper_minus": paired(units, boot, PAPER, list(OURS), q),
        "per_overlap": per_overlap(units, boot, main),
        "split_half": split_half(units, boot), "fig5": fig5(units, boot),
        "distil_or_not": distil_or_not(units, boot), "sensitivity": sensitivity(units, boot),
        "seconds_per_teacher": seconds_per_teacher(units), "lambda_counts": lambda_counts(units),
        "nmi": nmi_summary(nmi, boot),
        "sweep_axes": {k: [str(v) for v in vals] for k, vals in SWEEP.items()},
        "sweep_scores": list(SWEEP_SCORES)}


def best_of_ours(units: List[dict], boot: int = 2000, measure: str = "kendall",
                 ranking: Optional[dict] = None) -> str:
    """The variant of ours with the highest mean ``measure`` (the demo's default-choosing rule;
    reported, so a reader can check it). ``ranking``: :func:`ranking_summary` of ``units`` when
    already computed (``summarise(...)["ranking"]``)."""
    summ = ranking if ranking is not None else ranking_summary(units, boot)
    cands = [m for m in OURS if "Approx. I" not in m and "exact" not in m]
    return max(cands, key=lambda m: summ[m][measure]["mean"])
