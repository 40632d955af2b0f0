r"""Teacher assessment by the Sinkhorn distance (paper 1, Sec. 5, Eq. 24, Alg. 4; docs/assessment.md).

For every teacher ``h`` of a repository, with its embedding ``phi_h`` and logits ``f_h`` on the
target training set ``{(x_i, y_i)}``::

    M(f_h) = 1/N sum_i S_eps( softmax(f_h(x_i) / tau), softmax(f_S^h(x_i) / tau) )     (Eq. 24)

with the (C_T, C_S) cost of Eq. 6-8 built from ``phi_h`` (:func:`teacher_cost`). Lower is better:
a teacher whose predictions can be transported cheaply onto what a student of the target task
predicts is related to that task. ``f_S^h`` is, by ``method``:

* ``"approx2"`` (default, Alg. 4): a fictitious student, multinomial logistic regression fitted
  on ``(phi_h(x_i), y_i)`` (:func:`fit_linear_probe`): one small convex fit per teacher.
* ``"approx1"``: one student trained on the target task without any teacher, the same for every
  teacher; pass its training-set logits as ``student_logits``.
* ``"exact"``: the student actually distilled from teacher ``h``; pass ``train_student``, a
  callable ``(teacher, cost, labels) -> student logits on the training set``.

Teachers are given by their outputs on the target training set (:class:`TeacherOutputs`), which is
all any of the three needs and what one forward pass per teacher produces.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .. import _validation as V
from ..cost import class_centers, euclidean_cost, normalize_cost, teacher_class_centers
from ..ops.sinkhorn.api import sinkhorn

_METHODS = {"approx2", "approx1", "exact"}


@dataclass
class TeacherOutputs:
    """A teacher's outputs on the target task's training set.

    Attributes:
        name: identifier used in reports.
        features: (N, d) embeddings ``phi_T(x_i)`` (the input of the teacher's last linear layer).
        logits: (N, C_T) teacher logits ``f_T(x_i)`` over the teacher's own classes.
        classifier_weight: (C_T, d) last-layer weight (``nn.Linear.weight`` layout); its
            L2-normalised rows are the teacher's class centres (Eq. 8) when ``class_centers`` is
            not given.
        class_centers: (C_T, d) stored teacher class centres, used as-is when given.
        meta: free-form information (architecture, training classes, ...), carried to reports.
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
        seconds: (H,) wall time spent on each teacher (cost, fictitious student, Sinkhorn).
        method: "approx2", "approx1" or "exact".
        costs: the (C_T, C_S) cost matrix of each teacher.
        student_logits: the logits each score compared against (fictitious students for
            "approx2"), on the training set.
    """
    names: List[str]
    scores: torch.Tensor
    ranking: List[int]
    best: int
    seconds: List[float]
    method: str
    costs: List[torch.Tensor]
    student_logits: List[torch.Tensor]

    @property
    def best_name(self) -> str:
        return self.names[self.best]

    def as_dict(self) -> dict:
        return {"method": self.method, "names": list(self.names),
                "scores": [float(s) for s in self.scores], "ranking": list(self.ranking),
                "best": self.best, "best_name": self.best_name, "seconds": list(self.seconds)}


def _check_labels(labels, n, num_classes):
    labels = V.check_labels("labels", labels, n=n, rows_of="the teachers' outputs")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    num_classes = V.check_positive_int("num_classes", num_classes)
    return V.check_labels("labels", labels, num_classes=num_classes), num_classes


def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                     weight_decay: float = 1e-3, max_iter: int = 100,
                     standardize: bool = True) -> torch.Tensor:
    r"""Fit multinomial logistic regression on ``(features, labels)`` and return its logits on
    ``features`` (the fictitious student of Approximation II).

    Minimises ``mean_i CE(y_i, W x_i + b) + weight_decay/2 ||W||^2`` in float64 with full-batch
    L-BFGS (strong-Wolfe line search) from ``W = 0, b = 0``: the problem is strictly convex for
    ``weight_decay > 0``, so the fit is deterministic and independent of any random state.
    Features are standardised per dimension first (statistics of ``features``) so one
    ``weight_decay`` suits teachers whose embeddings have very different scales.

    Returns: (N, num_classes) logits, float32.
    """
    V.check_tensor("features", features, (2,))
    labels, num_classes = _check_labels(labels, features.shape[0], num_classes)
    weight_decay = V.check_nonnegative("weight_decay", weight_decay)
    max_iter = V.check_positive_int("max_iter", max_iter)
    x = features.detach().to(torch.float64)
    if standardize:
        x = (x - x.mean(0)) / x.std(0, unbiased=False).clamp_min(1e-8)
    y = labels.to(x.device)
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device,
                    requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-12, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (x @ w + b).to(torch.float32)


def teacher_cost(teacher: TeacherOutputs, labels: torch.Tensor, num_classes: int, *,
                 normalize_student_centers: bool = True,
                 normalize: Optional[str] = None) -> torch.Tensor:
    r"""The (C_T, C_S) cost of Eq. 6-8 for one teacher on the target task.

    Student class centres are the mean teacher embedding of each target class (Eq. 6); teacher
    centres are the stored ones or the L2-normalised classifier rows (Eq. 8). With Eq. 8 the
    teacher centres are unit vectors, so by default the student centres are L2-normalised as well:
    otherwise ``M`` would mostly measure the norm of the mean embedding (which differs between
    architectures) rather than its direction. ``normalize`` is passed to
    :func:`selkd_kernels.cost.normalize_cost`.
    """
    labels, num_classes = _check_labels(labels, teacher.features.shape[0], num_classes)
    e_s = class_centers(teacher.features.detach().float(), labels.to(teacher.features.device),
                        num_classes)
    if teacher.class_centers is not None:
        e_t = teacher.class_centers.detach().float()
    else:
        e_t = teacher_class_centers(teacher.classifier_weight.float())
        if normalize_student_centers:
            e_s = e_s / e_s.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return normalize_cost(euclidean_cost(e_t, e_s), normalize)


def sinkhorn_score(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
                   cost: torch.Tensor, *, tau: float = 3.0, eps: float = 0.1, n_iters: int = 100,
                   tol: Optional[float] = 1e-6, chunk: int = 4096, backend: str = "auto") -> float:
    """``1/N sum_i S_eps(softmax(z_T,i/tau), softmax(z_S,i/tau))`` (Eq. 24), without gradients,
    in row chunks so memory stays bounded for a large target set."""
    V.check_ot_shapes(teacher_logits, student_logits, cost, a_name="teacher_logits",
                      b_name="student_logits", cost_name="cost")
    tau = V.check_positive("tau", tau)
    total = 0.0
    n = teacher_logits.shape[0]
    with torch.no_grad():
        for s in range(0, n, chunk):
            p_t = torch.softmax(teacher_logits[s:s + chunk].float() / tau, dim=1)
            p_s = torch.softmax(student_logits[s:s + chunk].float() / tau, dim=1)
            r = sinkhorn(p_t, p_s, cost.float(), eps=eps, n_iters=n_iters, tol=tol,
                         backend=backend, check_marginals=False)
            total += float(r.loss.double().sum())
    return total / n


def _progress(iterable, enabled, desc, total):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, total=total, leave=False)


def assess_teachers(teachers: Sequence[TeacherOutputs], labels: torch.Tensor,
                    num_classes: Optional[int] = None, *, method: str = "approx2",
                    tau: float = 3.0, eps: float = 0.1, n_iters: int = 100,
                    tol: Optional[float] = 1e-6, student_logits: Optional[torch.Tensor] = None,
                    train_student: Optional[Callable[[TeacherOutputs, torch.Tensor,
                                                      torch.Tensor], torch.Tensor]] = None,
                    probe_weight_decay: float = 1e-3, probe_max_iter: int = 100,
                    normalize_student_centers: bool = True, cost_normalize: Optional[str] = "mean",
                    backend: str = "auto", progress: bool = True) -> AssessmentResult:
    r"""Score every teacher by Eq. 24 and rank them (paper 1, Alg. 4). Lower score is better.

    Args:
        teachers: the repository, as :class:`TeacherOutputs` on the target training set.
        labels: (N,) target labels of that training set.
        num_classes: number of target classes C_S (default: max label + 1).
        method: "approx2" (fictitious linear student per teacher, the paper's choice),
            "approx1" (needs ``student_logits``) or "exact" (needs ``train_student``).
        tau, eps, n_iters, tol, backend: of the Sinkhorn distance (paper defaults tau=3, eps=0.1).
        student_logits: (N, C_S) logits of one student trained without a teacher ("approx1").
        train_student: ``(teacher, cost, labels) -> (N, C_S) logits`` of a student distilled from
            that teacher ("exact"), e.g. a training loop with :class:`selkd_kernels.SinkhornKDLoss`.
        probe_weight_decay, probe_max_iter: of :func:`fit_linear_probe` ("approx2").
        normalize_student_centers, cost_normalize: of :func:`teacher_cost`. The default
            ``"mean"`` divides each teacher's cost by its mean entry: the Sinkhorn distance scales
            with ``M``, and without a common scale a teacher whose embedding is merely larger
            would look worse.
        progress: show a tqdm bar over teachers.

    Returns: :class:`AssessmentResult`.
    """
    V.check_choice("method", method, _METHODS)
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
    labels, num_classes = _check_labels(labels, n, num_classes)
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

    scores, seconds, costs, s_logits = [], [], [], []
    for t in _progress(teachers, progress, f"assess ({method})", len(teachers)):
        t0 = time.perf_counter()
        cost = teacher_cost(t, labels, num_classes,
                            normalize_student_centers=normalize_student_centers,
                            normalize=cost_normalize)
        if method == "approx2":
            z_s = fit_linear_probe(t.features, labels, num_classes,
                                   weight_decay=probe_weight_decay, max_iter=probe_max_iter)
        elif method == "approx1":
            z_s = student_logits.detach()
        else:
            z_s = train_student(t, cost, labels)
            V.check_tensor("train_student output", z_s, (2,))
            if tuple(z_s.shape) != (n, num_classes):
                raise ValueError(f"train_student must return ({n}, {num_classes}) logits, got "
                                 f"{tuple(z_s.shape)}")
            z_s = z_s.detach()
        score = sinkhorn_score(t.logits.detach(), z_s.to(t.logits.device), cost.to(t.logits.device),
                               tau=tau, eps=eps, n_iters=n_iters, tol=tol, backend=backend)
        seconds.append(time.perf_counter() - t0)
        scores.append(score)
        costs.append(cost)
        s_logits.append(z_s)
    sc = torch.tensor(scores, dtype=torch.float64)
    # stable sort: equal scores keep repository order, so the choice is reproducible
    ranking = torch.sort(sc, stable=True).indices.tolist()
    return AssessmentResult(names=[t.name for t in teachers], scores=sc, ranking=ranking,
                            best=ranking[0], seconds=seconds, method=method, costs=costs,
                            student_logits=s_logits)
