r"""Teacher assessment by optimal transport (paper 1, Sec. 5, Eq. 24, Alg. 4; docs/assessment.md).

For every teacher ``h`` of a repository, with its embedding ``phi_h`` and logits ``f_h`` on the
target training set ``{(x_i, y_i)}``, ``p_T,i = softmax(f_h(x_i) / tau)`` over the teacher's C_T
classes and ``p_S,i = softmax(f_S^h(x_i) / tau)`` over the C_S target classes::

    M(f_h) = 1/N sum_i D(p_T,i, p_S,i)                                                  (Eq. 24)

with the (C_T, C_S) cost ``M`` of Eq. 6-8 built from ``phi_h`` (:func:`teacher_cost`). Lower is
better. ``D`` is chosen by ``score``:

* ``"sinkhorn"``: the paper's ``S_eps(a, b) = <T*, M> - eps H(T*)``. Its entropy term rewards a
  teacher for being unsure: a high-entropy ``p_T`` lowers the score without any relation to the
  task.
* ``"transport"``: the transport cost ``<T*, M>`` of the same entropic plan, without the entropy
  term.
* ``"divergence"``: the debiased Sinkhorn divergence
  ``S(a, b) - (S(a, a) + S(b, b)) / 2``. ``a`` lives on the teacher's classes and ``b`` on the
  target classes, both points of the teacher's embedding (their centres), so ``S(a, a)`` uses
  the teacher-teacher cost between teacher centres and ``S(b, b)`` the student-student cost
  between target centres, on the same scale as ``M`` (:func:`teacher_costs`). It is >= 0 and
  removes the entropic bias of ``S_eps`` in both arguments.

``f_S^h`` is, by ``method``:

* ``"approx2"`` (default, Alg. 4): a fictitious student, multinomial logistic regression on
  ``(phi_h(x_i), y_i)``. With ``probe="cv"`` its weight decay is chosen from a grid by k-fold
  cross-validated log-loss on the target training labels and ``p_S`` are the out-of-fold
  predictions (:func:`cross_validated_probe`), so the probe cannot just memorise the labels it
  is scored against; ``probe="fixed"`` fits once with ``probe_weight_decay`` and scores its
  in-sample predictions (the paper's procedure; its regularisation is not stated).
* ``"approx1"``: one student trained on the target task without a teacher, the same for every
  teacher; pass its training-set logits as ``student_logits``.
* ``"exact"``: the student actually distilled from teacher ``h``; pass ``train_student``, a
  callable ``(teacher, cost, labels) -> student logits on the training set``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _validation as V
from ..apps.training import progress as _progress
from ..cost import (class_centers, classifier_centers, cost_scale, euclidean_cost,
                    normalize_cost)
from ..ops.sinkhorn.api import sinkhorn

METHODS = ("approx2", "approx1", "exact")
SCORES = ("sinkhorn", "transport", "divergence")
PROBES = ("cv", "fixed")
DEFAULT_PROBE_GRID = (1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class TeacherOutputs:
    """A teacher's outputs on the target task's training set.

    Attributes:
        name: identifier used in reports.
        features: (N, d) embeddings ``phi_T(x_i)`` (the input of the teacher's last linear layer).
        logits: (N, C_T) teacher logits ``f_T(x_i)`` over the teacher's own classes.
        classifier_weight: (C_T, d) last-layer weight (``nn.Linear.weight`` layout), used for the
            Eq. 8 cost (:func:`selkd_kernels.cost.classifier_cost`) when ``class_centers`` is not
            given.
        class_centers: (C_T, d) stored teacher class centres (class means of the teacher's
            embedding on its own training data), used as-is when given.
        meta: free-form information (architecture, training classes, ...), carried to reports.

    Example::

        with torch.no_grad():
            phi = teacher.features(x_train)
            out = TeacherOutputs("resnet-a", phi, teacher.head(phi),
                                 classifier_weight=teacher.head.weight)
    """
    name: str
    features: torch.Tensor
    logits: torch.Tensor
    classifier_weight: Optional[torch.Tensor] = None
    class_centers: Optional[torch.Tensor] = None
    meta: Dict = field(default_factory=dict)

    def __post_init__(self):
        V.check_tensor("features", self.features, (2,))
        V.check_tensor("logits", self.logits, (2,))
        if self.logits.shape[0] != self.features.shape[0]:
            raise ValueError(f"logits has {self.logits.shape[0]} rows but features has "
                             f"{self.features.shape[0]}")
        d, c_t = self.features.shape[1], self.logits.shape[1]
        for nm in ("classifier_weight", "class_centers"):
            t = getattr(self, nm)
            if t is not None:
                V.check_tensor(nm, t, (2,))
                if tuple(t.shape) != (c_t, d):
                    raise ValueError(f"{nm} must have shape ({c_t}, {d}) (teacher classes x "
                                     f"feature dim), got {tuple(t.shape)}")
        if self.classifier_weight is None and self.class_centers is None:
            raise ValueError("classifier_weight: give the teacher's classifier weight or its "
                             "stored class_centers; the cost matrix needs one of them")

    @property
    def num_classes(self) -> int:
        return self.logits.shape[1]


@dataclass
class AssessmentResult:
    """Outcome of :func:`assess_teachers`.

    Attributes:
        names: teacher names, in input order.
        scores: (H,) Eq. 24 values, lower is better.
        ranking: teacher indices from best (lowest score) to worst.
        best: index of the chosen teacher (``ranking[0]``).
        seconds: (H,) wall time spent on each teacher (cost, fictitious student, transport).
        method, score, probe: the options used.
        costs: the (C_T, C_S) cost matrix of each teacher.
        student_logits: the logits each score compared against (out-of-fold fictitious students
            for ``probe="cv"``), on the training set.
        probe_weight_decay: (H,) the fictitious student's weight decay (chosen per teacher for
            ``probe="cv"``; None for other methods).
        rows: per teacher, the (N,) per-sample values whose mean is the score.

    Example::

        >>> import torch, selkd_kernels as sk
        >>> _ = torch.manual_seed(0)
        >>> y = torch.arange(150) % 3                    # the target task: 3 classes
        >>> w = torch.eye(5, 6)                          # teachers: 5 classes on 6-d features
        >>> def teacher(name, signal):                   # teacher classes 0-2 follow the target's
        ...     phi = torch.randn(150, 6)
        ...     phi[:, :3] += signal * torch.eye(3)[y]
        ...     return sk.TeacherOutputs(name, phi, phi @ w.T, classifier_weight=w)
        >>> r = sk.assess_teachers([teacher("unrelated", 0.0), teacher("related", 5.0)], y, 3,
        ...                        progress=False)
        >>> r.best_name, r.ranking
        ('related', [1, 0])
    """
    names: List[str]
    scores: torch.Tensor
    ranking: List[int]
    best: int
    seconds: List[float]
    method: str
    costs: List[torch.Tensor]
    student_logits: List[torch.Tensor]
    score: str = "sinkhorn"
    probe: str = "fixed"
    probe_weight_decay: Optional[List[float]] = None
    rows: Optional[List[torch.Tensor]] = None

    @property
    def best_name(self) -> str:
        return self.names[self.best]

    def as_dict(self) -> dict:
        return {"method": self.method, "score": self.score, "probe": self.probe,
                "names": list(self.names), "scores": [float(s) for s in self.scores],
                "ranking": list(self.ranking), "best": self.best, "best_name": self.best_name,
                "seconds": list(self.seconds), "probe_weight_decay": self.probe_weight_decay}


def _check_labels(labels, n, num_classes):
    labels = V.check_labels("labels", labels, n=n, rows_of="the teachers' outputs")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    num_classes = V.check_positive_int("num_classes", num_classes)
    return V.check_labels("labels", labels, num_classes=num_classes), num_classes


# ------------------------------------------------------------------------ fictitious student

def _standardise(features):
    x = features.detach().to(torch.float64)
    return (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-8)


def _objective(theta, xb, y1h, weights, wd, r):
    """Per-problem ``sum_i weights_fi CE_i + wd_f/2 ||W_f||^2`` and its gradient (closed form,
    no autograd). theta: (F, r+1, C) with the bias as the last row."""
    z = torch.matmul(xb, theta)                                      # (F, N, C)
    lse = torch.logsumexp(z, -1, keepdim=True)
    f = ((lse.squeeze(-1) - (z * y1h).sum(-1)) * weights).sum(1)
    g = torch.matmul(xb.T, (torch.exp(z - lse) - y1h) * weights.unsqueeze(-1))
    w = theta[:, :r]
    f = f + 0.5 * wd * (w * w).sum((1, 2))
    g[:, :r] += wd.view(-1, 1, 1) * w
    return f, g


def _two_loop(g, hist_s, hist_y):
    """L-BFGS direction ``-H g`` for every problem at once (histories: lists of (F, P))."""
    q = g.clone()
    alphas = []
    for s_k, y_k in reversed(list(zip(hist_s, hist_y))):
        rho = 1.0 / (s_k * y_k).sum(1, keepdim=True).clamp_min(1e-300)
        a = rho * (s_k * q).sum(1, keepdim=True)
        q -= a * y_k
        alphas.append((rho, a))
    if hist_s:
        s_k, y_k = hist_s[-1], hist_y[-1]
        q *= (s_k * y_k).sum(1, keepdim=True) / (y_k * y_k).sum(1, keepdim=True).clamp_min(1e-300)
    for (s_k, y_k), (rho, a) in zip(zip(hist_s, hist_y), reversed(alphas)):
        q += s_k * (a - rho * (y_k * q).sum(1, keepdim=True))
    return -q


def _svd_basis(x):
    """``x = U S V^T``: the penalised optimum has ``W = V B``, so fitting ``B`` on ``U S`` (at
    most N columns) is the same problem with fewer unknowns. Returns ([U S, 1], V^T)."""
    u, sv, vt = torch.linalg.svd(x, full_matrices=False)
    keep = sv > sv.max() * 1e-10
    xr = u[:, keep] * sv[keep]
    return torch.cat([xr, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1), vt[keep]


def _lbfgs(theta, xb, y1h, weights, weight_decay, max_iter, tol, memory=6):
    """Vectorised L-BFGS with Armijo backtracking for independent softmax regressions (one per
    row of ``weights``): each keeps its own history and step and stops when its largest
    gradient entry is below ``tol``. Strictly convex problems: the unique minimiser."""
    r = xb.shape[1] - 1
    wd = torch.full((weights.shape[0],), float(weight_decay), dtype=xb.dtype)
    f, g = _objective(theta, xb, y1h, weights, wd, r)
    hist_s, hist_y = [], []
    active = torch.ones(weights.shape[0], dtype=torch.bool)
    for _ in range(max_iter):
        active &= g.flatten(1).abs().amax(1) > tol
        if not bool(active.any()):
            break
        gf = g.flatten(1)
        d = _two_loop(gf, hist_s, hist_y)
        d = torch.where(((d * gf).sum(1) < 0).unsqueeze(1), d, -gf)  # keep a descent direction
        slope = (d * gf).sum(1)
        step = active.to(xb.dtype)
        for _ls in range(30):
            cand = theta + (step.view(-1, 1) * d).view_as(theta)
            f_new, g_new = _objective(cand, xb, y1h, weights, wd, r)
            bad = active & (f_new > f + 1e-4 * step * slope)
            if not bool(bad.any()):
                break
            step = torch.where(bad, step * 0.5, step)
        hist_s.append((cand - theta).flatten(1))
        hist_y.append((g_new - g).flatten(1))
        if len(hist_s) > memory:
            hist_s.pop(0)
            hist_y.pop(0)
        theta, f, g = cand, f_new, g_new
    return theta


def _regression_problem(x, y, masks, num_classes):
    """The set-up of ``len(masks)`` softmax regressions for :func:`_lbfgs`: the basis of
    :func:`_svd_basis` ``(xb, vt)``, one-hot targets, per-problem sample weights (problem ``f``
    on the rows ``masks[f]``) and the zero start. Returns (xb, vt, y1h, weights, theta0)."""
    xb, vt = _svd_basis(x)
    y1h = torch.nn.functional.one_hot(y, num_classes).to(x.dtype)
    weights = masks / masks.sum(1, keepdim=True)
    theta = torch.zeros(masks.shape[0], xb.shape[1], num_classes, dtype=x.dtype)
    return xb, vt, y1h, weights, theta


def _softmax_regressions(x, y, masks, num_classes, weight_decay, max_iter, tol=1e-5):
    """Fit ``len(masks)`` independent multinomial logistic regressions, problem ``f`` on the
    rows ``masks[f]`` (``mean CE + weight_decay/2 ||W_f||^2``), from zero, by :func:`_lbfgs` in
    the basis of :func:`_svd_basis`. Returns (W (F, d, C), b (F, C))."""
    xb, vt, y1h, weights, theta = _regression_problem(x, y, masks, num_classes)
    theta = _lbfgs(theta, xb, y1h, weights, weight_decay, max_iter, tol)
    return torch.matmul(vt.T, theta[:, :-1]), theta[:, -1]


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                     weight_decay: float = 1e-3, max_iter: int = 500,
                     standardize: bool = True) -> torch.Tensor:
    r"""Fit multinomial logistic regression on ``(features, labels)`` and return its logits on
    ``features`` (the fictitious student of Approximation II, scored in-sample).

    Minimises ``mean_i CE(y_i, W x_i + b) + weight_decay/2 ||W||^2`` in float64 with full-batch
    L-BFGS from ``W = 0, b = 0`` (:func:`_softmax_regressions`): strictly convex for
    ``weight_decay > 0``, so the fit is deterministic. Features are standardised per dimension
    first so one ``weight_decay`` suits embeddings of different scales.

    Returns: (N, num_classes) logits, float32.

    Example::

        z = fit_linear_probe(phi, y, 10, weight_decay=1e-2)
    """
    V.check_tensor("features", features, (2,))
    labels, num_classes = _check_labels(labels, features.shape[0], num_classes)
    weight_decay = V.check_nonnegative("weight_decay", weight_decay)
    max_iter = V.check_positive_int("max_iter", max_iter)
    x = _standardise(features) if standardize else features.detach().to(torch.float64)
    y = labels.to(x.device)
    masks = torch.ones(1, x.shape[0], dtype=x.dtype)
    w, b = _softmax_regressions(x, y, masks, num_classes, weight_decay, max_iter)
    return (x @ w[0] + b[0]).to(torch.float32)


def stratified_folds(labels: torch.Tensor, folds: int, seed: int = 0) -> torch.Tensor:
    """(N,) fold index of every sample: each class's samples, in a seeded random order, dealt
    round-robin to the folds, so every fold holds about the same share of every class."""
    labels = V.check_labels("labels", labels)
    folds = V.check_positive_int("folds", folds)
    g = torch.Generator().manual_seed(seed)
    out = torch.empty_like(labels)
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        out[idx] = torch.arange(len(idx)) % folds
    return out


def cross_validated_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                          weight_decays: Sequence[float] = DEFAULT_PROBE_GRID, folds: int = 5,
                          max_iter: int = 500, seed: int = 0
                          ) -> Tuple[torch.Tensor, float, List[float]]:
    r"""The fictitious student with its regularisation chosen on the target training labels.

    For every weight decay of the grid, ``folds``-fold stratified cross-validation
    (:func:`stratified_folds`; at most as many folds as the smallest class has samples) gives
    out-of-fold logits for every sample; the weight decay with the lowest mean out-of-fold
    cross-entropy wins (ties: the larger decay), and its out-of-fold logits are returned. The
    grid is fitted from the largest decay down, each fit starting from the previous solution. Each
    sample is thus predicted by a probe that never saw its label.

    Returns: ``(logits (N, C) float32, chosen weight decay, out-of-fold log-loss per grid
    value)``.

    Example::

        z_oof, wd, losses = cross_validated_probe(phi, y, 10)
    """
    V.check_tensor("features", features, (2,))
    labels, num_classes = _check_labels(labels, features.shape[0], num_classes)
    grid = [V.check_positive("weight_decays", w) for w in weight_decays]
    if not grid:
        raise ValueError("weight_decays must hold at least one value")
    smallest = int(torch.bincount(labels, minlength=num_classes)[labels.unique()].min())
    folds = min(V.check_positive_int("folds", folds), smallest)
    if folds < 2:
        raise ValueError("labels: cross-validation needs at least 2 samples of every class")
    x, y = _standardise(features), labels
    fold = stratified_folds(y, folds, seed)
    masks = torch.stack([(fold != f) for f in range(folds)]).to(x.dtype)
    xb, _, y1h, weights, theta = _regression_problem(x, y, masks, num_classes)
    best, losses = None, {}
    # from the strongest decay down, each fit warm-started from the previous one's solution
    for wd in sorted(grid, reverse=True):
        theta = _lbfgs(theta, xb, y1h, weights, wd, max_iter, 1e-5)
        oof = torch.matmul(xb, theta)[fold, torch.arange(len(y))]   # each row from its fold
        losses[wd] = float(torch.nn.functional.cross_entropy(oof, y))
        if best is None or losses[wd] < best[0]:
            best = (losses[wd], wd, oof)
    losses = [losses[w] for w in grid]
    return best[2].to(torch.float32), float(best[1]), losses


# ---------------------------------------------------------------------------------- costs

def _centres(teacher: TeacherOutputs, labels, num_classes):
    """Teacher and target class centres in the teacher's embedding (Eq. 6 and stored centres,
    or the centred, normalised Eq. 8 pair)."""
    feats = teacher.features.detach().float()
    labels = labels.to(feats.device)
    if teacher.class_centers is not None:
        return teacher.class_centers.detach().float(), class_centers(feats, labels, num_classes)
    return classifier_centers(teacher.classifier_weight.float(), feats, labels, num_classes)


def teacher_cost(teacher: TeacherOutputs, labels: torch.Tensor, num_classes: int, *,
                 normalize: Optional[str] = None) -> torch.Tensor:
    r"""The (C_T, C_S) cost of Eq. 6-8 for one teacher on the target task.

    Student class centres are the mean teacher embedding of each target class (Eq. 6); teacher
    centres are the stored ones (then both are class means of the same embedding), or, from the
    classifier weight (Eq. 8), both sides centred and L2-normalised
    (:func:`selkd_kernels.cost.classifier_centers`). ``normalize`` is passed to
    :func:`selkd_kernels.cost.normalize_cost`.

    Example::

        cost = teacher_cost(outputs, y_train, num_classes=10, normalize="mean")
    """
    labels, num_classes = _check_labels(labels, teacher.features.shape[0], num_classes)
    e_t, e_s = _centres(teacher, labels, num_classes)
    return normalize_cost(euclidean_cost(e_t, e_s), normalize)


def teacher_costs(teacher: TeacherOutputs, labels: torch.Tensor, num_classes: int, *,
                  normalize: Optional[str] = None
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""``(M_TS, M_TT, M_SS)``: the Eq. 6-8 cost and the teacher-teacher and student-student
    costs between the same centres, all divided by the one scale ``normalize`` takes from
    ``M_TS`` (so the three live on one scale, as the debiased divergence needs).

    Example::

        m_ts, m_tt, m_ss = teacher_costs(outputs, y_train, 10, normalize="mean")
    """
    labels, num_classes = _check_labels(labels, teacher.features.shape[0], num_classes)
    e_t, e_s = _centres(teacher, labels, num_classes)
    m_ts = euclidean_cost(e_t, e_s)
    s = cost_scale(m_ts, normalize)
    return m_ts / s, euclidean_cost(e_t, e_t) / s, euclidean_cost(e_s, e_s) / s


# ------------------------------------------------------------------------------- transport

def _rows(a, b, cost, score, eps, n_iters, tol, backend):
    r = sinkhorn(a, b, cost, eps=eps, n_iters=n_iters, tol=tol, backend=backend,
                 check_marginals=False, return_plan=(score == "transport"))
    if score == "transport":
        return (r.plan * cost).sum((-2, -1)).double()
    return r.loss.double()


def transport_rows(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                   cost: torch.Tensor, *, score: str = "sinkhorn",
                   self_costs: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                   tau: float = 3.0, eps: float = 0.1, n_iters: int = 100,
                   tol: Optional[float] = 1e-6, chunk: int = 4096,
                   backend: str = "auto") -> torch.Tensor:
    r"""Per-sample values ``D(softmax(z_T,i/tau), softmax(z_S,i/tau))`` of Eq. 24 (module
    docstring), float64, without gradients, in row chunks so memory stays bounded.

    ``self_costs = (M_TT, M_SS)`` is required for ``score="divergence"``.

    Example::

        rows = transport_rows(z_t, z_s, m_ts, score="divergence", self_costs=(m_tt, m_ss))
    """
    V.check_ot_shapes(teacher_logits, student_logits, cost, a_name="teacher_logits",
                      b_name="student_logits", cost_name="cost")
    V.check_choice("score", score, SCORES)
    tau = V.check_positive("tau", tau)
    if score == "divergence":
        if self_costs is None:
            raise ValueError("self_costs: score='divergence' needs the teacher-teacher and "
                             "student-student costs (teacher_costs)")
        m_tt, m_ss = (c.float() for c in self_costs)
    out = []
    with torch.no_grad():
        for s in range(0, teacher_logits.shape[0], chunk):
            p_t = torch.softmax(teacher_logits[s:s + chunk].float() / tau, dim=1)
            p_s = torch.softmax(student_logits[s:s + chunk].float() / tau, dim=1)
            kw = dict(eps=eps, n_iters=n_iters, tol=tol, backend=backend)
            rows = _rows(p_t, p_s, cost.float(), score, **kw)
            if score == "divergence":
                rows = rows - 0.5 * (_rows(p_t, p_t, m_tt, "sinkhorn", **kw)
                                     + _rows(p_s, p_s, m_ss, "sinkhorn", **kw))
            out.append(rows)
    return torch.cat(out)


# ------------------------------------------------------------------------------- assessment

def _check_teachers(teachers):
    if not isinstance(teachers, (list, tuple)) or not teachers:
        raise ValueError("teachers must be a non-empty list of TeacherOutputs")
    for i, t in enumerate(teachers):
        if not isinstance(t, TeacherOutputs):
            raise ValueError(f"teachers[{i}] must be a TeacherOutputs, got {type(t).__name__}")
    n = teachers[0].features.shape[0]
    for i, t in enumerate(teachers):
        if t.features.shape[0] != n:
            raise ValueError(f"teachers[{i}] has outputs for {t.features.shape[0]} samples, "
                             f"teachers[0] for {n}: all must be evaluated on the same set")
    return n


def _check_method_inputs(method, n, num_classes, student_logits, train_student):
    if method == "approx1":
        if student_logits is None:
            raise ValueError("student_logits: method='approx1' needs the logits of a student "
                             "trained without a teacher")
        V.check_tensor("student_logits", student_logits, (2,))
        if tuple(student_logits.shape) != (n, num_classes):
            raise ValueError(f"student_logits must have shape ({n}, {num_classes}), got "
                             f"{tuple(student_logits.shape)}")
    if method == "exact" and not callable(train_student):
        raise ValueError("train_student: method='exact' needs a callable "
                         "(teacher, cost, labels) -> student logits")


@dataclass
class _Options:
    method: str
    score: str
    probe: str
    probe_weight_decay: float
    probe_weight_decays: Tuple[float, ...]
    probe_folds: int
    probe_max_iter: int
    cost_normalize: Optional[str]
    sinkhorn: dict


def _student_logits(t, labels, num_classes, cost, o: _Options, student_logits, train_student):
    """The logits ``f_S^h`` the teacher is compared with, and the probe's weight decay."""
    if o.method == "approx1":
        return student_logits.detach(), None
    if o.method == "exact":
        z = train_student(t, cost, labels)
        V.check_tensor("train_student output", z, (2,))
        if tuple(z.shape) != (labels.shape[0], num_classes):
            raise ValueError(f"train_student must return ({labels.shape[0]}, {num_classes}) "
                             f"logits, got {tuple(z.shape)}")
        return z.detach(), None
    if o.probe == "cv":
        z, wd, _ = cross_validated_probe(t.features, labels, num_classes,
                                         weight_decays=o.probe_weight_decays,
                                         folds=o.probe_folds, max_iter=o.probe_max_iter)
        return z, wd
    return fit_linear_probe(t.features, labels, num_classes, weight_decay=o.probe_weight_decay,
                            max_iter=o.probe_max_iter), o.probe_weight_decay


def _assess_one(t, labels, num_classes, o: _Options, student_logits, train_student):
    m_ts, m_tt, m_ss = teacher_costs(t, labels, num_classes, normalize=o.cost_normalize)
    z_s, wd = _student_logits(t, labels, num_classes, m_ts, o, student_logits, train_student)
    dev = t.logits.device
    rows = transport_rows(t.logits.detach(), z_s.to(dev), m_ts.to(dev), score=o.score,
                          self_costs=(m_tt.to(dev), m_ss.to(dev)), **o.sinkhorn)
    return rows, m_ts, z_s, wd


def assess_teachers(teachers: Sequence[TeacherOutputs], labels: torch.Tensor,
                    num_classes: Optional[int] = None, *, method: str = "approx2",
                    score: str = "divergence", probe: str = "fixed", tau: float = 3.0,
                    eps: float = 0.1, n_iters: int = 100, tol: Optional[float] = 1e-6,
                    student_logits: Optional[torch.Tensor] = None,
                    train_student: Optional[Callable[[TeacherOutputs, torch.Tensor,
                                                      torch.Tensor], torch.Tensor]] = None,
                    probe_weight_decay: float = 1e-3,
                    probe_weight_decays: Sequence[float] = DEFAULT_PROBE_GRID,
                    probe_folds: int = 5, probe_max_iter: int = 500,
                    cost_normalize: Optional[str] = "mean", backend: str = "auto",
                    progress: bool = True) -> AssessmentResult:
    r"""Score every teacher by Eq. 24 (module docstring) and rank them (paper 1, Alg. 4). Lower
    score is better.

    Args:
        teachers: the repository, as :class:`TeacherOutputs` on the target training set.
        labels: (N,) target labels of that training set.
        num_classes: number of target classes C_S (default: max label + 1).
        method: "approx2" (fictitious linear student per teacher, the paper's choice),
            "approx1" (needs ``student_logits``) or "exact" (needs ``train_student``).
        score: "sinkhorn" (the paper's S_eps), "transport" (<T*, M>) or "divergence" (debiased
            Sinkhorn divergence).
        probe: "fixed" (one fit with ``probe_weight_decay``, scored in-sample) or "cv" (weight
            decay from ``probe_weight_decays`` by ``probe_folds``-fold cross-validation, scored
            out-of-fold); "approx2" only.
        tau, eps, n_iters, tol, backend: of the transport (paper defaults tau=3, eps=0.1).
        student_logits: (N, C_S) logits of one student trained without a teacher ("approx1").
        train_student: ``(teacher, cost, labels) -> (N, C_S) logits`` of a student distilled from
            that teacher ("exact").
        probe_max_iter: L-BFGS iterations of each probe fit.
        cost_normalize: of :func:`teacher_cost`. ``"mean"`` divides each teacher's cost by its
            mean entry, so one eps means the same for every teacher; None keeps raw distances
            (paper 1, Eq. 7).
        progress: show a progress bar over teachers.

    Returns: :class:`AssessmentResult`.

    Example::

        r = assess_teachers(outputs, y_train, 10, score="divergence", probe="cv")
        print(r.best_name, r.scores)
    """
    V.check_choice("method", method, METHODS)
    V.check_choice("score", score, SCORES)
    V.check_choice("probe", probe, PROBES)
    n = _check_teachers(teachers)
    labels, num_classes = _check_labels(labels, n, num_classes)
    _check_method_inputs(method, n, num_classes, student_logits, train_student)
    o = _Options(method, score, probe, probe_weight_decay, tuple(probe_weight_decays),
                 probe_folds, probe_max_iter, cost_normalize,
                 dict(tau=tau, eps=eps, n_iters=n_iters, tol=tol, backend=backend))
    scores, seconds, costs, s_logits, wds, rows = [], [], [], [], [], []
    for t in _progress(teachers, progress, f"assess ({method}, {score})", len(teachers)):
        t0 = time.perf_counter()
        r, cost, z_s, wd = _assess_one(t, labels, num_classes, o, student_logits, train_student)
        seconds.append(time.perf_counter() - t0)
        scores.append(float(r.mean()))
        rows.append(r)
        costs.append(cost)
        s_logits.append(z_s)
        wds.append(wd)
    sc = torch.tensor(scores, dtype=torch.float64)
    # stable sort: equal scores keep repository order, so the choice is reproducible
    ranking = torch.sort(sc, stable=True).indices.tolist()
    return AssessmentResult(names=[t.name for t in teachers], scores=sc, ranking=ranking,
                            best=ranking[0], seconds=seconds, method=method, costs=costs,
                            student_logits=s_logits, score=score,
                            probe=probe if method == "approx2" else "-",
                            probe_weight_decay=wds if method == "approx2" else None, rows=rows)
