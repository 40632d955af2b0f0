r"""``selkd demo``: teacher assessment and cross-task distillation, end to end (paper 1, Sec. 6).

1. Build (or load from the cache) the model zoo of :mod:`selkd_kernels.apps.zoo`: teachers of two MLP
   families on every class window of the double sliding-window protocol.
2. Ground truth: for every target task and teacher, the test accuracy of a student distilled with
   :class:`selkd_kernels.SinkhornKDLoss` (plus students trained without a teacher).
3. Assess every teacher with our Sinkhorn metric (Approximation II; also Approximation I, the
   exact Eq. 24 and the Eq. 8 cost variant) and with NCE, LEEP, LogME and H-score.
4. Report: correlation of each metric with the ground truth (Tab. 11 style, plus Kendall, weighted
   Kendall and top-1 regret), per-teacher values (Tab. 16-20), baseline vs distilled accuracy
   across class-overlap ratios (Fig. 5), NMI of k-means on class centres against super-classes
   (Tab. 9), time per teacher (Tab. 13); distil the final student from the chosen teacher (and,
   for comparison, from all teachers weighted by their scores).

Sign convention: our metric is a distance (lower is better), the baselines are higher-better.
Every correlation and regret is computed on the oriented score ``Q`` (``Q = -M`` for ours, as in
paper 1, Sec. 6.2.3; ``Q`` = the metric for the baselines), so for all of them +1 means "ranks the
teachers exactly like the students' accuracy" and regret 0 means "picks the best teacher".
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import List

import numpy as np
import torch

from ..assessment import baselines as MT
from ..assessment.score import assess_teachers
from ..losses.multi_teacher import MultiTeacherSinkhornKDLoss
from .zoo import DATASETS, MLP, ZooConfig, _accuracy, _train, build_zoo, save_zoo

BASELINES = ("NCE", "LEEP", "LogME", "H-score")
OURS = "Ours (Approx. II)"
OURS_VARIANTS = (OURS, "Ours (Approx. I)", "Ours (exact Eq. 24)", "Ours (Approx. II, Eq. 8 cost)")
HIGHER_IS_BETTER = {**{b: True for b in BASELINES}, **{v: False for v in OURS_VARIANTS}}
MEASURES = ("pearson", "kendall", "weighted_kendall", "top1_regret")


def _bar(it, enabled, desc, total=None):
    if not enabled:
        return it
    from tqdm.auto import tqdm
    return tqdm(it, desc=desc, total=total, leave=False, file=sys.stderr)


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _baseline_scores(outs, labels, c_s):
    """Each baseline on each teacher's outputs, with its time per teacher."""
    fns = {
        "NCE": lambda o: MT.nce(o.logits, labels),
        "LEEP": lambda o: MT.leep(torch.softmax(o.logits.double(), 1), labels, c_s),
        "LogME": lambda o: MT.logme(o.features, labels, c_s),
        "H-score": lambda o: MT.h_score(o.features, labels, c_s),
    }
    scores, secs = {}, {}
    for name, fn in fns.items():
        vals = [_timed(lambda o=o: fn(o)) for o in outs]
        scores[name] = [v for v, _ in vals]
        secs[name] = [t for _, t in vals]
    return scores, secs


def _nmi_table(zoo, tasks, progress):
    """Tab. 9: k-means on the target classes' centres in the embedding of the teacher of the
    first family on window 0 vs an untrained network of the same architecture; NMI against the
    super-classes (synthetic data only)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score
    from ..cost import class_centers
    sup = zoo.data.superclass
    h0 = 0
    rows = []
    for w in _bar(tasks, progress, "NMI (Tab. 9)"):
        task = zoo.target_task(w)
        truth = sup[torch.tensor(task.classes)].numpy()
        k = len(np.unique(truth))
        row = {"task": w, "overlap": zoo.overlap(zoo.teachers[h0]["window"], w)}
        for kind in ("teacher", "random"):
            feats = zoo.teacher_outputs(h0, task.x_train).features if kind == "teacher" else \
                zoo.random_features(h0, task.x_train, seed=zoo.cfg.seed)
            cen = class_centers(feats, task.y_train, len(task.classes)).numpy()
            pred = KMeans(n_clusters=k, n_init=10, random_state=zoo.cfg.seed).fit_predict(cen)
            row[kind] = float(normalized_mutual_info_score(truth, pred))
        rows.append(row)
    return rows


def _distill_final(zoo, w, assessment):
    """The student of task ``w`` distilled from the chosen teacher, from the teacher that was
    best in hindsight, and from all teachers weighted by ``softmax(-score / 0.1)``."""
    task = zoo.target_task(w)
    best = assessment.best
    gt = [zoo.ground_truth_for(w, h)["acc"] for h in range(len(zoo.teachers))]
    oracle = int(np.argmax(gt))
    chosen_out = zoo.teacher_outputs(best, task.x_train)
    (acc_chosen, _), secs = _timed(lambda: zoo.train_student(task, chosen_out, seed=0))
    acc_base, _ = zoo.train_student(task, None, seed=0)
    outs = [zoo.teacher_outputs(h, task.x_train) for h in range(len(zoo.teachers))]
    crit = MultiTeacherSinkhornKDLoss(assessment.costs, scores=assessment.scores.tolist(),
                                      temperature=0.1, tau=zoo.cfg.tau, eps=zoo.cfg.eps,
                                      weight=zoo.cfg.kd_weight, n_iters=zoo.cfg.sinkhorn_iters)
    z_ts = [o.logits for o in outs]
    torch.manual_seed(zoo.cfg.seed * 7919)
    multi = MLP(task.x_train.shape[1], (zoo.cfg.student_hidden,), len(task.classes))
    _train(multi, task.x_train, task.y_train, zoo.cfg.student_epochs,
           extra_loss=lambda z, y: crit(z, z_ts, y))
    return {"task": w, "chosen_teacher": zoo.teachers[best]["name"],
            "oracle_teacher": zoo.teachers[oracle]["name"],
            "student_acc_no_teacher": acc_base, "student_acc_chosen_teacher": acc_chosen,
            "student_acc_oracle_teacher_gt": gt[oracle],
            "student_acc_multi_teacher": _accuracy(multi, task.x_test, task.y_test),
            "multi_teacher_weights": [float(x) for x in crit.teacher_weights],
            "distill_seconds": secs}


def run_dataset(cfg: ZooConfig, cache_dir, progress) -> dict:
    (zoo, build_s) = _timed(lambda: build_zoo(cfg, cache_dir=cache_dir, progress=progress))
    tasks = zoo.task_ids
    H = len(zoo.teachers)
    pairs = [(w, h) for w in tasks for h in range(-1, H)]
    for w, h in _bar(pairs, progress, f"ground truth: distil students ({cfg.dataset})"):
        zoo.ground_truth_for(w, h)
    save_zoo(zoo, cache_dir)

    per_task, times = [], {k: [] for k in (*OURS_VARIANTS, *BASELINES, "teacher forward")}
    for w in _bar(tasks, progress, f"assess teachers ({cfg.dataset})"):
        task = zoo.target_task(w)
        c_s = len(task.classes)
        fw = [_timed(lambda h=h: zoo.teacher_outputs(h, task.x_train)) for h in range(H)]
        outs = [o for o, _ in fw]
        times["teacher forward"] += [t for _, t in fw]
        acc = [zoo.ground_truth_for(w, h)["acc"] for h in range(H)]
        base = zoo.ground_truth_for(w, -1)
        kw = dict(tau=cfg.tau, eps=cfg.eps, n_iters=100, cost_normalize=cfg.cost_normalize,
                  progress=False)
        runs = {
            OURS: assess_teachers(outs, task.y_train, c_s, method="approx2", **kw),
            "Ours (Approx. I)": assess_teachers(outs, task.y_train, c_s, method="approx1",
                                                student_logits=base["train_logits"], **kw),
            "Ours (exact Eq. 24)": assess_teachers(
                outs, task.y_train, c_s, method="exact",
                train_student=lambda t, cost, y: zoo.ground_truth_for(
                    w, [o.name for o in outs].index(t.name))["train_logits"], **kw),
            "Ours (Approx. II, Eq. 8 cost)": assess_teachers(
                [zoo.teacher_outputs(h, task.x_train, centers="classifier") for h in range(H)],
                task.y_train, c_s, method="approx2", **kw),
        }
        if w == tasks[0]:
            first_assessment = runs[OURS]
        scores = {k: r.scores.tolist() for k, r in runs.items()}
        for k, r in runs.items():
            times[k] += r.seconds
        # the exact score's real cost is training the students, which the ground truth did
        times["Ours (exact Eq. 24)"][-H:] = [
            s + zoo.ground_truth_for(w, h)["seconds_per_student"]
            for h, s in enumerate(times["Ours (exact Eq. 24)"][-H:])]
        b_scores, b_secs = _baseline_scores(outs, task.y_train, c_s)
        scores.update(b_scores)
        for k, v in b_secs.items():
            times[k] += v
        corr = {m: MT.ranking_quality(scores[m], acc, HIGHER_IS_BETTER[m]) for m in scores}
        per_task.append({
            "task": w, "classes": task.classes, "no_teacher_acc": base["acc"],
            "teachers": [{"name": t["name"], "family": t["family"], "window": t["window"],
                          "overlap": zoo.overlap(t["window"], w), "teacher_test_acc": t["test_acc"],
                          "student_acc": acc[h]} for h, t in enumerate(zoo.teachers)],
            "scores": scores,
            "normalized_oriented_scores": {
                m: MT.minmax_normalize(MT.oriented(s, HIGHER_IS_BETTER[m])).tolist()
                for m, s in scores.items()},
            "chosen": {m: zoo.teachers[int(np.argmax(MT.oriented(s, HIGHER_IS_BETTER[m])))]["name"]
                       for m, s in scores.items()},
            "correlation": corr, "assessment": runs[OURS].as_dict()})

    metrics = list(per_task[0]["scores"])
    summary = {m: {q: float(np.nanmean([t["correlation"][m][q] for t in per_task]))
                   for q in MEASURES} for m in metrics}
    h0 = 0
    overlap_rows = [{"task": w, "teacher": zoo.teachers[h0]["name"],
                     "overlap": zoo.overlap(zoo.teachers[h0]["window"], w),
                     "no_teacher_acc": zoo.ground_truth_for(w, -1)["acc"],
                     "distilled_acc": zoo.ground_truth_for(w, h0)["acc"]}
                    for w in range(len(zoo.windows)) if (w, h0) in zoo.ground_truth]
    nmi = _nmi_table(zoo, tasks, progress) if zoo.data.superclass is not None else None
    final = _distill_final(zoo, tasks[0], first_assessment)
    save_zoo(zoo, cache_dir)
    return {
        "dataset": cfg.dataset, "config": {k: (list(v) if isinstance(v, tuple) else v)
                                           for k, v in cfg.__dict__.items()},
        "zoo": {"windows": zoo.windows, "build_seconds": build_s,
                "teachers": [{"name": t["name"], "family": t["family"], "window": t["window"],
                              "test_acc": t["test_acc"]} for t in zoo.teachers]},
        "tasks": per_task, "correlation_mean": summary,
        "seconds_per_teacher": {k: float(np.mean(v)) for k, v in times.items() if v},
        "overlap": overlap_rows, "nmi": nmi, "final_distillation": final}


# ------------------------------------------------------------------------------------ output

def _fmt_corr_table(res) -> str:
    lines = [f"Ranking quality vs. distilled-student accuracy, {res['dataset']} "
             f"(mean over {len(res['tasks'])} target tasks; ours oriented as Q = -M)",
             f"{'metric':32s} " + " ".join(f"{'T' + str(t['task']) + ' r':>7s}"
                                           for t in res["tasks"])
             + f" {'Pearson':>8s} {'Kendall':>8s} {'wKendall':>8s} {'regret':>7s}"]
    for m, s in res["correlation_mean"].items():
        per = " ".join(f"{t['correlation'][m]['pearson']:7.2f}" for t in res["tasks"])
        lines.append(f"{m:32s} {per} {s['pearson']:8.3f} {s['kendall']:8.3f} "
                     f"{s['weighted_kendall']:8.3f} {s['top1_regret'] * 100:6.2f}%")
    return "\n".join(lines)


def _fmt_teacher_table(res, t) -> str:
    ms = [OURS, *BASELINES]
    short = {OURS: "Ours"}
    head = f"{'teacher':10s} {'overlap':>7s} {'acc%':>6s} " + " ".join(
        f"{short.get(m, m):>10s}" for m in ms)
    lines = [f"Per-teacher values, {res['dataset']} task {t['task']} (min-max normalised, "
             f"oriented so 1 = best; no-teacher student {t['no_teacher_acc'] * 100:.2f}%)", head]
    for h, tt in enumerate(t["teachers"]):
        lines.append(f"{tt['name']:10s} {tt['overlap'] * 100:6.0f}% {tt['student_acc'] * 100:6.2f} "
                     + " ".join(f"{t['normalized_oriented_scores'][m][h]:10.2f}" for m in ms))
    return "\n".join(lines)


def _fmt_other(res) -> str:
    out = [f"Baseline vs distilled accuracy across class overlap, {res['dataset']} "
           f"(teacher {res['overlap'][0]['teacher'] if res['overlap'] else '-'}):",
           f"{'overlap':>8s} {'no teacher%':>12s} {'distilled%':>11s}"]
    for r in sorted(res["overlap"], key=lambda r: -r["overlap"]):
        out.append(f"{r['overlap'] * 100:7.0f}% {r['no_teacher_acc'] * 100:12.2f} "
                   f"{r['distilled_acc'] * 100:11.2f}")
    if res["nmi"]:
        out += ["NMI of k-means on target class centres vs super-classes:",
                f"{'overlap':>8s} {'random':>7s} {'teacher':>8s}"]
        for r in res["nmi"]:
            out.append(f"{r['overlap'] * 100:7.0f}% {r['random']:7.2f} {r['teacher']:8.2f}")
    out += ["Time per teacher (s):"]
    for k, v in res["seconds_per_teacher"].items():
        out.append(f"  {k:32s} {v:8.4f}")
    f = res["final_distillation"]
    out += [f"Final student (task {f['task']}): chosen teacher {f['chosen_teacher']} -> "
            f"{f['student_acc_chosen_teacher'] * 100:.2f}% (no teacher "
            f"{f['student_acc_no_teacher'] * 100:.2f}%; best-in-hindsight {f['oracle_teacher']} "
            f"{f['student_acc_oracle_teacher_gt'] * 100:.2f}% (mean over seeds); score-weighted "
            f"multi-teacher {f['student_acc_multi_teacher'] * 100:.2f}%)"]
    return "\n".join(out)


def _plots(res, out_dir) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = []
    ds = res["dataset"]
    tasks = res["tasks"]
    ms = [OURS, *BASELINES]
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.2), squeeze=False)
    for ax, t in zip(axes[0], tasks):
        acc = [tt["student_acc"] * 100 for tt in t["teachers"]]
        for m in ms:
            ax.plot(t["normalized_oriented_scores"][m], acc, "o", label=m, alpha=0.8)
        ax.set_title(f"task {t['task']}")
        ax.set_xlabel("normalised score (1 = best)")
    axes[0][0].set_ylabel("distilled student accuracy (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    p = os.path.join(out_dir, f"scores_vs_accuracy_{ds}.png")
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(p)
    if res["overlap"]:
        rows = sorted(res["overlap"], key=lambda r: -r["overlap"])
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        g = [r["overlap"] * 100 for r in rows]
        ax.plot(g, [r["no_teacher_acc"] * 100 for r in rows], "s--", label="no teacher")
        ax.plot(g, [r["distilled_acc"] * 100 for r in rows], "o-", label="Sinkhorn KD")
        ax.invert_xaxis()
        ax.set_xlabel("class overlap ratio g (%)")
        ax.set_ylabel("student test accuracy (%)")
        ax.set_title(f"{ds}, teacher {rows[0]['teacher']}")
        ax.legend()
        fig.tight_layout()
        p = os.path.join(out_dir, f"accuracy_vs_overlap_{ds}.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths


def _parser():
    ap = argparse.ArgumentParser(prog="selkd demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small zoo (synthetic only, 8 teachers, 2 students per pair)")
    ap.add_argument("--dataset", choices=(*DATASETS, "all"), default=None,
                    help="default: synthetic with --quick, all otherwise")
    ap.add_argument("--out", default=None, help="directory for report.json and PNG plots")
    ap.add_argument("--cache", default=None, help="zoo cache directory (default ~/.cache/selkd)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: the models are tiny, and extra threads on "
                         "a busy machine cost far more than they give)")
    ap.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return ap


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"threads must be >= 1, got {args.threads}")
    datasets = [args.dataset or ("synthetic" if args.quick else "all")]
    if datasets == ["all"]:
        datasets = list(DATASETS)
    progress = not args.no_progress
    old_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = []
    try:
        with warnings.catch_warnings():
            # the compiled backend may be absent; "auto" falls back to the reference quietly
            warnings.filterwarnings("ignore", message=".*backend .* unavailable.*")
            for ds in datasets:
                cfg = ZooConfig.preset(ds, quick=args.quick, seed=args.seed)
                res = run_dataset(cfg, args.cache, progress)
                results.append(res)
                print(_fmt_corr_table(res))
                print()
                for t in res["tasks"][:1 if args.quick else None]:
                    print(_fmt_teacher_table(res, t))
                    print()
                print(_fmt_other(res))
                print()
    finally:
        torch.set_num_threads(old_threads)
    total = time.perf_counter() - t0
    report = {
        "sign_convention": "Our Sinkhorn metric M is lower-better; NCE, LEEP, LogME and H-score "
                           "are higher-better. All correlations and regrets use the oriented "
                           "score Q (Q = -M for ours, Q = metric for the baselines), so +1 is a "
                           "perfect ranking for every metric and top1_regret = max accuracy - "
                           "accuracy of the teacher with the highest Q.",
        "quick": bool(args.quick), "seconds_total": total, "datasets": results}
    print(f"selkd demo finished in {total:.1f} s")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        plots = []
        for res in results:
            plots += _plots(res, args.out)
        report["plots"] = [os.path.basename(p) for p in plots]
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1, default=float)
        print(f"wrote {os.path.join(args.out, 'report.json')} and {len(plots)} plot(s)")
    return 0
