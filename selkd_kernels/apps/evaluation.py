r"""Every assessment metric on every (task, teacher) of a zoo, beside its ground truth
(paper 1, Sec. 6.2; docs/assessment.md).

:func:`evaluate_zoo` returns one record per target task ("unit"): the ground truth of each teacher
(:mod:`selkd_kernels.apps.students`), the value of every metric, its time, the sensitivity sweep
of our scores, and the distil-or-not decision. :mod:`selkd_kernels.apps.report` turns a list of
units (tasks x seeds) into the figures with confidence intervals.

Our metrics share one fictitious student per teacher and setting: the cross-validated probe
(:func:`selkd_kernels.assessment.score.cross_validated_probe`) or the paper-style fixed probe;
every score variant is :func:`selkd_kernels.assessment.score.transport_rows` on the costs of
:func:`selkd_kernels.assessment.score.teacher_costs` -- the same code
:func:`selkd_kernels.assess_teachers` runs.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List

import numpy as np
import torch

from ..assessment import baselines as B
from ..assessment.score import (cross_validated_probe, fit_linear_probe, teacher_costs,
                                transport_rows)
from .students import task_ground_truth
from .training import progress
from .zoo import Zoo

# name -> (score, probe, cost centres); "exact"/"approx1" use the ground-truth students
OURS = {
    "Ours: S_eps, fixed probe (paper)": ("sinkhorn", "fixed", "stored"),
    "Ours: S_eps, CV probe": ("sinkhorn", "cv", "stored"),
    "Ours: <T,M>, CV probe": ("transport", "cv", "stored"),
    "Ours: divergence, CV probe": ("divergence", "cv", "stored"),
    "Ours: divergence, fixed probe": ("divergence", "fixed", "stored"),
    "Ours: divergence, CV probe, Eq. 8 cost": ("divergence", "cv", "classifier"),
    "Ours: S_eps, Approx. I": ("sinkhorn", "approx1", "stored"),
    "Ours: S_eps, exact Eq. 24": ("sinkhorn", "exact", "stored"),
}
PAPER = "Ours: S_eps, fixed probe (paper)"
BASELINES = ("NCE", "LEEP", "NLEEP", "LogME", "LogME (reference code)", "H-score",
             "H-score (shrinkage)", "SFDA", "PARC", "TransRate")
ORACLE = "Overlap oracle (not a metric)"
HIGHER_IS_BETTER = {**{m: False for m in OURS}, **{b: True for b in BASELINES}, ORACLE: True}
FIXED_PROBE_WD = 1e-3
SWEEP = {"probe_weight_decay": (1e-4, 1e-3, 1e-2, 1e-1, 1.0), "cost_normalize": (None, "mean"),
         "tau": (1.0, 3.0, 10.0), "eps": (0.01, 0.1, 1.0)}
SWEEP_SCORES = ("sinkhorn", "divergence")


def _baselines(feats, logits, y, c_s) -> Dict[str, Callable[[], float]]:
    probs = torch.softmax(logits.double(), 1)
    return {
        "NCE": lambda: B.nce(logits, y),
        "LEEP": lambda: B.leep(probs, y, c_s),
        "NLEEP": lambda: B.nleep(feats, y, c_s),
        "LogME": lambda: B.logme(feats, y, c_s),
        "LogME (reference code)": lambda: B.logme(feats, y, c_s, variant="reference"),
        "H-score": lambda: B.h_score(feats, y, c_s),
        "H-score (shrinkage)": lambda: B.h_score(feats, y, c_s, shrinkage="ledoit-wolf"),
        "SFDA": lambda: B.sfda(feats, y, c_s),
        "PARC": lambda: B.parc(feats, y, c_s),
        "TransRate": lambda: B.transrate(feats, y, c_s),
    }


class _TeacherScorer:
    """Our scores for one teacher on one task, sharing costs and probes across variants."""

    def __init__(self, zoo: Zoo, h: int, task, gt: dict, sinkhorn_kw: dict):
        # one forward pass; the Eq. 8 variant differs only in having no stored centres
        stored = zoo.teacher_outputs(h, task.x_lab, centers="stored")
        self.out = {"stored": stored,
                    "classifier": dataclasses.replace(stored, class_centers=None)}
        self.y, self.c_s = task.y_lab, len(task.classes)
        self.gt, self.no_teacher, self.kw = gt, None, sinkhorn_kw
        self._probes: Dict = {}
        self._costs: Dict = {}
        self._rows: Dict = {}
        self.seconds: Dict[str, float] = {}

    def costs(self, centers, normalize):
        key = (centers, normalize)
        if key not in self._costs:
            self._costs[key] = teacher_costs(self.out[centers], self.y, self.c_s,
                                             normalize=normalize)
        return self._costs[key]

    @staticmethod
    def _probe_key(kind):
        """The cache key of a probe: ``"cv"``, or the fixed probe's weight decay as a float
        (so ``"fixed"`` and ``"0.001"`` are one probe)."""
        if kind == "cv":
            return kind
        return FIXED_PROBE_WD if kind == "fixed" else float(kind)

    def probe(self, kind):
        key = self._probe_key(kind)
        if key not in self._probes:
            t0 = time.perf_counter()
            f = self.out["stored"].features
            if key == "cv":
                z, wd, _ = cross_validated_probe(f, self.y, self.c_s)
            else:
                wd = key
                z = fit_linear_probe(f, self.y, self.c_s, weight_decay=wd)
            self._probes[key] = (z, wd, time.perf_counter() - t0)
        return self._probes[key]

    def rows(self, score, probe, centers="stored", normalize="mean", **over):
        """Per-sample values of one score variant and its seconds (probe + transport), cached
        by the full arguments: a repeated variant returns the first call's rows and time."""
        kind = probe if probe in ("exact", "approx1") else self._probe_key(probe)
        key = (score, kind, centers, normalize, tuple(sorted({**self.kw, **over}.items())))
        if key not in self._rows:
            self._rows[key] = self._solve(score, probe, centers, normalize, over)
        return self._rows[key]

    def _solve(self, score, probe, centers, normalize, over):
        if probe == "exact":
            z_s, probe_s = self.gt["train_logits"], self.gt["seconds_per_student"]
        elif probe == "approx1":
            z_s, probe_s = self.no_teacher, 0.0
        else:
            z_s, _, probe_s = self.probe(probe)
        t0 = time.perf_counter()
        m_ts, m_tt, m_ss = self.costs(centers, normalize)
        kw = {**self.kw, **over}
        r = transport_rows(self.out[centers].logits, z_s, m_ts, score=score,
                           self_costs=(m_tt, m_ss), **kw)
        return r, probe_s + time.perf_counter() - t0


def _ours(scorers: List[_TeacherScorer]):
    scores, secs = {}, {}
    for name, (score, probe, centers) in OURS.items():
        vals = [s.rows(score, probe, centers) for s in scorers]
        scores[name] = [float(r.mean()) for r, _ in vals]
        secs[name] = [t for _, t in vals]
    return scores, secs


def _sweep(scorers: List[_TeacherScorer]) -> dict:
    """One-at-a-time sensitivity of our scores around the default (CV probe, mean-normalised
    cost, tau 3, eps 0.1); the weight-decay axis replaces the CV probe by fixed probes."""
    out = {}
    for score in SWEEP_SCORES:
        for axis, values in SWEEP.items():
            for v in values:
                if axis == "probe_weight_decay":
                    vals = [s.rows(score, str(v))[0] for s in scorers]
                elif axis == "cost_normalize":
                    vals = [s.rows(score, "cv", normalize=v)[0] for s in scorers]
                else:
                    vals = [s.rows(score, "cv", **{axis: v})[0] for s in scorers]
                out[f"{score}|{axis}={v}"] = [float(r.mean()) for r in vals]
    return out


def permutation_z(scorer: _TeacherScorer, score: str, probe: str, permutations: int = 5,
                  seed: int = 0) -> float:
    """How far a teacher's score lies below the score of the same teacher with its outputs
    shuffled across the samples (which keeps its marginal predictions and breaks their relation
    to the samples), in standard errors of the per-sample values. Large: the teacher's outputs
    say something about these samples."""
    rows, _ = scorer.rows(score, probe)
    g = torch.Generator().manual_seed(seed)
    z_t = scorer.out["stored"].logits
    z_s, _, _ = scorer.probe(probe)
    m_ts, m_tt, m_ss = scorer.costs("stored", "mean")
    null = []
    for _ in range(permutations):
        perm = torch.randperm(z_t.shape[0], generator=g)
        null.append(transport_rows(z_t[perm], z_s, m_ts, score=score, self_costs=(m_tt, m_ss),
                                   **scorer.kw))
    diff = torch.stack(null).mean(0) - rows
    se = float(diff.std()) / max(len(diff), 1) ** 0.5
    return float(diff.mean()) / max(se, 1e-12)


def _teacher_rows(zoo: Zoo, w: int, gt: dict) -> List[dict]:
    return [{"name": t["name"], "family": t["family"], "window": t["window"],
             "overlap": zoo.overlap(t["window"], w), "teacher_test_acc": t["test_acc"],
             "teacher_entropy": t["entropy"], "acc": gt[h]["acc"], "lambda": gt[h]["lambda"],
             "test_by_seed": gt[h]["test_by_seed"], "val_acc": gt[h]["val_acc"],
             "test_by_lambda": gt[h]["test_by_lambda"], "val_by_lambda": gt[h]["val_by_lambda"]}
            for h, t in enumerate(zoo.teachers)]


def _baseline_scores(scorers: List[_TeacherScorer], task):
    """Every baseline on every teacher, from the outputs the scorers already hold."""
    scores, secs = {b: [] for b in BASELINES}, {b: [] for b in BASELINES}
    for s in scorers:
        out = s.out["stored"]
        for name, fn in _baselines(out.features, out.logits, task.y_lab,
                                   len(task.classes)).items():
            t0 = time.perf_counter()
            scores[name].append(float(fn()))
            secs[name].append(time.perf_counter() - t0)
    return scores, secs


def evaluate_task(zoo: Zoo, w: int, default_metric: str, sweep: bool = True) -> dict:
    """One unit: ground truth, every metric, the sweep (when ``sweep``) and the distil-or-not
    inputs."""
    gt = task_ground_truth(zoo, w)
    task = zoo.target_task(w)
    kw = dict(tau=zoo.cfg.tau, eps=zoo.cfg.eps, n_iters=100, tol=1e-6)
    scorers = [_TeacherScorer(zoo, h, task, gt[h], kw) for h in range(len(zoo.teachers))]
    for s in scorers:
        s.no_teacher = gt[-1]["train_logits"]
    scores, secs = _ours(scorers)
    b_scores, b_secs = _baseline_scores(scorers, task)
    scores.update(b_scores)
    secs.update(b_secs)
    teachers = _teacher_rows(zoo, w, gt)
    scores[ORACLE] = [t["overlap"] for t in teachers]
    score, probe, _ = OURS[default_metric]
    best = int(np.argmin(scores[default_metric]))
    return {
        "seed": zoo.cfg.seed, "task": w, "classes": list(task.classes),
        "no_teacher": {k: gt[-1][k] for k in ("acc", "test_by_seed", "val_acc")},
        "teachers": teachers, "scores": scores, "seconds": secs,
        "probe_weight_decay_cv": [s.probe("cv")[1] for s in scorers],
        "sweep": _sweep(scorers) if sweep else {},
        "default_metric": default_metric, "chosen": best,
        "chosen_permutation_z": permutation_z(scorers[best], score, probe, seed=zoo.cfg.seed)}


def evaluate_zoo(zoo: Zoo, default_metric: str, show_progress: bool = True,
                 sweep: bool = True) -> List[dict]:
    """:func:`evaluate_task` for every task of the zoo."""
    return [evaluate_task(zoo, w, default_metric, sweep)
            for w in progress(zoo.task_ids, show_progress,
                              f"assess ({zoo.cfg.dataset}, seed {zoo.cfg.seed})")]


def nmi_rows(zoo: Zoo, family_teacher: int = 0) -> List[dict]:
    """Paper 1, Tab. 9: k-means (k = number of super-classes present) on the target classes'
    centres in the embedding of teacher ``family_teacher`` and of an untrained network of the
    same architecture; NMI against the super-classes, for every task (one overlap each)."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score
    from ..cost import class_centers
    sup = zoo.data.superclass
    t = zoo.teachers[family_teacher]
    rows = []
    for w in range(len(zoo.windows)):
        task = zoo.target_task(w)
        truth = sup[torch.tensor(task.classes)].numpy()
        row = {"seed": zoo.cfg.seed, "task": w, "teacher": t["name"],
               "overlap": zoo.overlap(t["window"], w)}
        for kind in ("teacher", "random"):
            feats = zoo.teacher_outputs(family_teacher, task.x_lab).features if kind == "teacher" \
                else zoo.random_features(family_teacher, task.x_lab, seed=zoo.cfg.seed)
            cen = class_centers(feats, task.y_lab, len(task.classes)).numpy()
            pred = KMeans(n_clusters=len(np.unique(truth)), n_init=10,
                          random_state=zoo.cfg.seed).fit_predict(cen)
            row[kind] = float(normalized_mutual_info_score(truth, pred))
        rows.append(row)
    return rows
