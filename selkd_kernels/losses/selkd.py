r"""Selective knowledge distillation losses, prediction and metrics (paper 2, Sec. 3.2; docs/losses.md).

A single teacher knows all N classes; a student learns only ``n`` selected ones
(``selected_classes``, in the teacher's numbering; labels are given in that numbering too).

**Closed set** (Sec. 3.2.1, Eq. 9-11 with ``U = {P 1 = 1}``). The inner problem with only the row
constraint is solved by a row softmax (Appendix B), so Eq. 10 becomes Hinton's loss restricted to
the selected classes::

    L = CE(y, z_S) + lam * tau^2 * mean_i KL(P_T,i || P_S,i),
    P_T,i = softmax(z_T,i[selected] / tau),  P_S,i = softmax(z_S,i / tau)

The teacher's softmax is taken over the selected logits only (its other classes are dropped
before normalising, not after). The CE term uses temperature 1. ``tau^2`` keeps the KD gradient's
scale independent of ``tau`` (Hinton et al., 2015); pass ``tau_squared=False`` for the paper's
literal Eq. 1.

Optional ``coupling="balanced"``: the teacher target is the batch coupling with rows = samples
(mass 1 each) and columns = selected classes with mass = the batch's label counts, solved by
:func:`selkd_kernels.sinkhorn` on the per-batch cost ``M_ij = -log P_T,ij`` (nonnegative) with
``eps = 1``. Then ``K = exp(-M) = P_T``, so without the column constraint the plan is exactly the
softmax target; the column constraint redistributes the teacher's mass to match the batch's label
frequencies. Sinkhorn works with probability marginals, so both are divided by ``m``
(``a = 1/m``, ``b = counts/m``) and the plan is multiplied back by ``m`` (its rows are then
renormalised to 1, which removes the residual row-marginal error of the last iteration).

**Open set** (Sec. 3.2.2, Eq. 12-14, Alg. 1). The student has ``n + 1`` outputs, "not selected"
last. The teacher's open-set logits are its ``n`` selected logits followed by
``eps * logsumexp(others / eps)``, so ``softmax(. / eps)`` of the open-set logits gives the "not
selected" column exactly the teacher's total mass on the other classes at the coupling's
temperature (with ``eps = 1`` this is the plain logsumexp of docs/ops/partial_ot.md). Labels outside the selection
map to "not selected".
With ``gamma`` the number of selected samples in the batch (``gamma="labels"``) and both couplings
from :func:`selkd_kernels.partial_ot` at the same ``eps``::

    L = CE(Y | P_S) + lam * ( -sum_ij P_T,ij log P_S,ij ) / m,
    CE(Y | P_S) = -(1/m) sum_i log P_S,i,y_i

``log P_S`` comes from the log domain (``Z/eps - logsumexp(Z/eps) + rho``), never from the log of
an underflowed coupling. The teacher is frozen: its scores get no gradient.

**Prediction** (Sec. 3.2.2, end): for sample ``i``, argmax over
``[P_i,1 .. P_i,n+1, 1 - sum_j P_ij]``; the last two both mean "not selected". The "not selected"
score used for AUROC is the mass the coupling does not give to a selected class,
``1 - sum_{j <= n} P_ij``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .. import _validation as V
from ..ops.registry import check_backend_name
from ..ops.partial_ot.dispatch import get_backend as get_partial_ot_backend
from ..ops.partial_ot.api import (partial_ot_log, resolve_gamma,
                         validate_partial_ot_args)
from ..ops.sinkhorn.api import sinkhorn


# ---- labels and logits -------------------------------------------------------------------------

def _check_selected(selected_classes) -> torch.Tensor:
    sel = torch.as_tensor(selected_classes)
    if sel.dim() != 1 or sel.numel() == 0 or sel.dtype.is_floating_point or sel.dtype == torch.bool:
        raise ValueError(f"selected_classes must be a non-empty 1-D sequence of class indices, "
                         f"got {selected_classes!r}")
    sel = sel.long()
    if (sel < 0).any() or sel.unique().numel() != sel.numel():
        raise ValueError(f"selected_classes must hold distinct non-negative class indices, got "
                         f"{sel.tolist()}")
    return sel


def _check_target(target, m: int) -> torch.Tensor:
    return V.check_labels("target", target, n=m, rows_of="student_logits")


def local_labels(target: torch.Tensor, selected_classes, *, open_set: bool) -> torch.Tensor:
    """Map teacher-numbered labels to the student's columns.

    Selected class ``selected_classes[j]`` becomes ``j``. Other labels become ``n`` ("not selected")
    when ``open_set``; in the closed set they are an error.
    """
    sel = _check_selected(selected_classes).to(target.device)
    target = V.check_labels("target", target)
    hit = target.unsqueeze(1) == sel.unsqueeze(0)
    found = hit.any(1)
    local = hit.long().argmax(1)
    if open_set:
        return torch.where(found, local, torch.full_like(local, sel.numel()))
    if not bool(found.all()):
        raise ValueError("target contains classes outside selected_classes; the closed-set "
                         "student is trained on selected classes only (use open_set=True)")
    return local


def open_set_teacher_logits(teacher_logits: torch.Tensor, selected_classes,
                            temperature: float = 1.0) -> torch.Tensor:
    """(m, n+1): the selected logits, then ``T * logsumexp(others / T)`` ("not selected").

    ``softmax(result / T)`` equals the teacher's ``softmax(z / T)`` with all unselected classes
    merged into one column. The merge is exact only at the temperature it was made for, so the
    open-set loss merges at its coupling's ``eps`` (``T = 1`` is the plain logsumexp of docs/ops/partial_ot.md).
    """
    temperature = V.check_positive("temperature", temperature)
    V.check_tensor("teacher_logits", teacher_logits, (2,))
    sel = _check_selected(selected_classes).to(teacher_logits.device)
    N = teacher_logits.shape[1]
    if int(sel.max()) >= N:
        raise ValueError(f"selected_classes has class {int(sel.max())} but teacher_logits has "
                         f"only {N} classes")
    if sel.numel() >= N:
        raise ValueError("selected_classes covers every teacher class; the open set needs at "
                         "least one unselected class")
    rest = torch.ones(N, dtype=torch.bool, device=teacher_logits.device)
    rest[sel] = False
    other = temperature * torch.logsumexp(teacher_logits[:, rest] / temperature, dim=1,
                                          keepdim=True)
    return torch.cat([teacher_logits[:, sel], other], dim=1)


# ---- closed set --------------------------------------------------------------------------------

def balanced_teacher_coupling(teacher_sel_logits: torch.Tensor, local_target: torch.Tensor,
                              tau: float, *, n_iters: int = 50, backend: str = "auto"):
    """Rows-sum-to-1 batch coupling whose class marginal is the batch's label counts.

    Solved by :func:`selkd_kernels.sinkhorn` on the cost ``-log softmax(z_T / tau)`` with
    ``eps = 1`` (module docs). Returns an (m, n) tensor with rows summing to 1.
    """
    m, n = teacher_sel_logits.shape
    cd = V.compute_dtype(teacher_sel_logits)
    with torch.no_grad():
        cost = -torch.log_softmax(teacher_sel_logits.to(cd) / tau, dim=1)
        a = torch.full((1, m), 1.0 / m, dtype=cd, device=cost.device)
        counts = torch.bincount(local_target, minlength=n).to(cd)
        b = (counts / m).unsqueeze(0)
        res = sinkhorn(a, b, cost, eps=1.0, n_iters=n_iters, backend=backend, return_plan=True)
        plan = res.plan[0]
        return plan / plan.sum(1, keepdim=True).clamp_min(torch.finfo(cd).tiny)


def closed_set_selkd_loss(student_logits, teacher_logits, target, selected_classes, *,
                          tau: float = 4.0, weight: float = 1.0, tau_squared: bool = True,
                          coupling: str = "softmax", sinkhorn_iters: int = 50,
                          backend: str = "auto") -> torch.Tensor:
    """Closed-set SelKD loss (module docs); ``target`` in the teacher's numbering."""
    V.check_tensor("student_logits", student_logits, (2,))
    V.check_tensor("teacher_logits", teacher_logits, (2,))
    V.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    tau = V.check_positive("tau", tau)
    V.check_choice("coupling", coupling, {"softmax", "balanced"})
    sel = _check_selected(selected_classes)
    m, n = student_logits.shape
    if teacher_logits.shape[0] != m:
        raise ValueError(f"teacher_logits has batch size {teacher_logits.shape[0]} but "
                         f"student_logits has {m}")
    if n != sel.numel():
        raise ValueError(f"student_logits has {n} classes but selected_classes has {sel.numel()}")
    if int(sel.max()) >= teacher_logits.shape[1]:
        raise ValueError(f"selected_classes has class {int(sel.max())} but teacher_logits has "
                         f"only {teacher_logits.shape[1]} classes")
    y = local_labels(_check_target(target, m).to(student_logits.device), sel, open_set=False)
    cd = V.compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(cd)
    zt = teacher_logits.detach()[:, sel.to(teacher_logits.device)].to(cd)
    ce = F.cross_entropy(zs, y)
    log_ps = torch.log_softmax(zs / tau, dim=1)
    if coupling == "softmax":
        log_pt = torch.log_softmax(zt / tau, dim=1)
        kl = (torch.exp(log_pt) * (log_pt - log_ps)).sum(1).mean()
    else:
        p_t = balanced_teacher_coupling(zt, y, tau, n_iters=sinkhorn_iters, backend=backend)
        kl = (torch.xlogy(p_t, p_t) - p_t * log_ps).sum(1).mean()
    scale = tau * tau if tau_squared else 1.0
    return (ce + weight * scale * kl).to(student_logits.dtype)


# ---- open set ----------------------------------------------------------------------------------

class _OpenSetLossFunction(torch.autograd.Function):
    """Loss and student gradient from one fused backend call; backward only scales."""

    @staticmethod
    def forward(ctx, student_scores, teacher_scores, target, backend, gamma, eps, lam, method,
                n_iters):
        loss, grad = backend.loss_forward(student_scores, teacher_scores, target, gamma=gamma,
                                          eps=eps, lam=lam, method=method, n_iters=n_iters)
        ctx.save_for_backward(grad)
        ctx.in_dtype = student_scores.dtype
        return loss.to(student_scores.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype)).to(ctx.in_dtype), *([None] * 8)


def open_set_selkd_loss(student_scores, teacher_scores, target, *, gamma="labels",
                        eps: float = 1.0, weight: float = 1.0, method: str = "exact",
                        n_iters: int = 10, backend: str = "auto") -> torch.Tensor:
    """Open-set SelKD loss on scores that are already in the student's (n+1)-column space.

    Args:
        student_scores: (m, n+1) student scores, "not selected" last.
        teacher_scores: (m, n+1) teacher open-set scores (:func:`open_set_teacher_logits`).
        target: (m,) local labels in ``[0, n]``, ``n`` = "not selected".
        gamma: total coupling mass, a number in (0, m] or ``"labels"`` (selected count).
        eps, method, n_iters, backend: as in :func:`selkd_kernels.partial_ot`.
        weight: ``lam`` of Eq. 14.
    """
    eps, n_iters = validate_partial_ot_args(student_scores, eps, method, n_iters,
                                            name="student_scores")
    V.check_tensor("teacher_scores", teacher_scores, (2,))
    V.check_same_device(student_scores=student_scores, teacher_scores=teacher_scores,
                        target=target if isinstance(target, torch.Tensor) else None)
    if teacher_scores.shape != student_scores.shape:
        raise ValueError(f"teacher_scores must have shape {tuple(student_scores.shape)} like "
                         f"student_scores, got {tuple(teacher_scores.shape)}")
    m, k = student_scores.shape
    y = _check_target(target, m)
    if bool(((y < 0) | (y >= k)).any()):
        raise ValueError(f"target entries must be local labels in [0, {k - 1}]")
    weight = V.check_nonnegative("weight", weight)
    gamma = resolve_gamma(gamma, m, y, k)
    be = get_partial_ot_backend(backend, student_scores.device, m)
    teacher_scores = teacher_scores.detach()
    return _OpenSetLossFunction.apply(student_scores, teacher_scores, y, be, gamma, eps,
                                      float(weight), method, n_iters)


# ---- functional and module ---------------------------------------------------------------------

def selkd_loss(student_logits, teacher_logits, target, selected_classes, *, open_set=False,
               tau: float = 4.0, weight: float = 1.0, tau_squared: bool = True,
               coupling: str = "softmax", sinkhorn_iters: int = 50, eps: float = 1.0,
               gamma="labels", method: str = "exact", n_iters: int = 10,
               backend: str = "auto") -> torch.Tensor:
    """Selective KD loss (paper 2, Eq. 10 closed set / Eq. 14 open set).

    Args:
        student_logits: (m, n) closed set, or (m, n+1) open set ("not selected" last).
        teacher_logits: (m, N) full teacher logits (frozen).
        target: (m,) labels in the teacher's numbering.
        selected_classes: the n selected teacher classes; column j of the student is class
            ``selected_classes[j]``.
        open_set: which variant.
        tau, tau_squared, coupling, sinkhorn_iters: closed set (module docs).
        eps, gamma, method, n_iters: open set; see :func:`selkd_kernels.partial_ot`.
        weight: ``lam``, the weight of the distillation term.
        backend: kernels for the partial-OT coupling (open set) or the Sinkhorn solve
            (balanced closed set).
    """
    if not open_set:
        return closed_set_selkd_loss(student_logits, teacher_logits, target, selected_classes,
                                     tau=tau, weight=weight, tau_squared=tau_squared,
                                     coupling=coupling, sinkhorn_iters=sinkhorn_iters,
                                     backend=backend)
    V.check_tensor("student_logits", student_logits, (2,))
    eps = V.check_positive("eps", eps)
    sel = _check_selected(selected_classes)
    if student_logits.shape[1] != sel.numel() + 1:
        raise ValueError(f"student_logits must have n + 1 = {sel.numel() + 1} columns in the open "
                         f"set ('not selected' last), got {student_logits.shape[1]}")
    V.check_tensor("teacher_logits", teacher_logits, (2,))
    V.check_same_device(student_logits=student_logits, teacher_logits=teacher_logits)
    if teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(f"teacher_logits has batch size {teacher_logits.shape[0]} but "
                         f"student_logits has {student_logits.shape[0]}")
    zt = open_set_teacher_logits(teacher_logits.detach(), sel, temperature=eps)
    y = local_labels(_check_target(target, student_logits.shape[0]).to(student_logits.device),
                     sel, open_set=True)
    return open_set_selkd_loss(student_logits, zt, y, gamma=gamma, eps=eps, weight=weight,
                               method=method, n_iters=n_iters, backend=backend)


class SelKDLoss(torch.nn.Module):
    r"""Selective KD objective as a module (paper 2, Eq. 10 / Eq. 14).

    ``SelKDLoss(selected_classes, open_set=False, ...)``; ``forward(student_logits,
    teacher_logits, target)`` with the full (m, N) teacher logits and teacher-numbered labels.
    See :func:`selkd_loss` for the arguments and the module docs for the maths.
    """

    def __init__(self, selected_classes, open_set: bool = False, *, tau: float = 4.0,
                 weight: float = 1.0, tau_squared: bool = True, coupling: str = "softmax",
                 sinkhorn_iters: int = 50, eps: float = 1.0, gamma="labels",
                 method: str = "exact", n_iters: int = 10, backend: str = "auto"):
        super().__init__()
        self.register_buffer("selected_classes", _check_selected(selected_classes).clone())
        self.open_set = bool(open_set)
        self.tau = V.check_positive("tau", tau)
        self.weight = V.check_nonnegative("weight", weight)
        self.tau_squared = bool(tau_squared)
        self.coupling = V.check_choice("coupling", coupling, {"softmax", "balanced"})
        self.sinkhorn_iters = V.check_positive_int("sinkhorn_iters", sinkhorn_iters)
        self.eps = V.check_positive("eps", eps)
        if isinstance(gamma, str) and gamma != "labels":
            raise ValueError(f"gamma must be a number or 'labels', got {gamma!r}")
        self.gamma = gamma
        self.method = V.check_choice("method", method, {"exact", "bregman"})
        self.n_iters = V.check_positive_int("n_iters", n_iters)
        self.backend = check_backend_name(backend)

    @property
    def num_outputs(self) -> int:
        """Student outputs expected: n, or n + 1 in the open set."""
        return self.selected_classes.numel() + (1 if self.open_set else 0)

    def forward(self, student_logits, teacher_logits, target):
        return selkd_loss(student_logits, teacher_logits, target, self.selected_classes,
                          open_set=self.open_set, tau=self.tau, weight=self.weight,
                          tau_squared=self.tau_squared, coupling=self.coupling,
                          sinkhorn_iters=self.sinkhorn_iters, eps=self.eps, gamma=self.gamma,
                          method=self.method, n_iters=self.n_iters, backend=self.backend)

    def extra_repr(self):
        common = (f"n={self.selected_classes.numel()}, open_set={self.open_set}, "
                  f"weight={self.weight}")
        if self.open_set:
            return f"{common}, eps={self.eps}, gamma={self.gamma!r}, method={self.method!r}"
        return f"{common}, tau={self.tau}, coupling={self.coupling!r}"


# ---- prediction and metrics --------------------------------------------------------------------

@dataclass
class SelKDPrediction:
    """Output of :func:`selkd_predict`.

    Attributes:
        pred: (m,) predicted local class, ``n`` (= k - 1) meaning "not selected".
        not_selected_score: (m,) ``1 - sum_{j < n} P_ij``, higher = more likely not selected.
        coupling: (m, k) the partial-OT coupling ``P``.
    """
    pred: torch.Tensor
    not_selected_score: torch.Tensor
    coupling: torch.Tensor


def selkd_predict(student_scores: torch.Tensor, gamma, *, eps: float = 1.0,
                  method: str = "exact", n_iters: int = 10, backend: str = "auto",
                  labels=None) -> SelKDPrediction:
    """Open-set prediction by the partial-OT coupling of the test batch (paper 2, Sec. 3.2.2).

    For sample ``i`` take the argmax over ``[P_i,1 .. P_i,n+1, 1 - sum_j P_ij]``; the last two
    entries both mean "not selected" (local class ``n``). ``gamma`` is the expected number of
    selected samples in the batch (e.g. ``m`` times the selected fraction seen in training);
    ``"labels"`` with ``labels`` uses the true count (an oracle, for analysis only).

    Caveat (measured in ``python/selkd_digits.py``). The coupling only rescales rows, so within a
    row its argmax is the argmax of the scores; the rule differs from a plain argmax only through
    the slack ``1 - sum_j P_ij``. ``gamma`` counts the selected samples, yet the "not selected"
    column is part of the coupling too, so all m rows share a mass of ``gamma``: a row whose mass
    is close to ``gamma / m`` (what the CE term of Eq. 14 favours, and exactly what Alg. 1 returns
    when every row starts above 1) has slack ``1 - gamma / m``, which beats its best column
    whenever the selected fraction is at most 1/2. Such rules then reject many selected samples;
    the plain argmax over the n + 1 outputs does not have this bias.
    """
    eps, n_iters = validate_partial_ot_args(student_scores, eps, method, n_iters,
                                            name="student_scores")
    m, k = student_scores.shape
    gamma = resolve_gamma(gamma, m, labels, k)
    be = get_partial_ot_backend(backend, student_scores.device, m)
    with torch.no_grad():
        log_p = partial_ot_log(student_scores, gamma, eps, method, n_iters, be)
        p = torch.exp(log_p.to(V.compute_dtype(student_scores)))
        slack = (1.0 - p.sum(1)).clamp_min(0.0)
        ext = torch.cat([p, slack.unsqueeze(1)], dim=1)
        pred = ext.argmax(1).clamp_max(k - 1)
        not_sel = (1.0 - p[:, :k - 1].sum(1)).clamp(0.0, 1.0)
    return SelKDPrediction(pred, not_sel, p)


def auroc(scores, positives) -> float:
    """Area under the ROC curve of ``scores`` for the binary labels ``positives``.

    Mann-Whitney form with tied scores given their average rank (the same convention as
    scikit-learn's ``roc_auc_score``). NaN when one class is empty.
    """
    s = np.asarray(torch.as_tensor(scores).detach().cpu().double())
    y = np.asarray(torch.as_tensor(positives).detach().cpu().bool())
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError("scores and positives must be 1-D of the same length")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(s.size, dtype=np.float64)
    i = 0
    while i < s.size:
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def selkd_metrics(pred: torch.Tensor, not_selected_score: Optional[torch.Tensor],
                  local_target: torch.Tensor, num_selected: int) -> dict:
    """Open-set metrics (docs/losses.md).

    Args:
        pred: (m,) predicted local classes, ``num_selected`` = "not selected".
        not_selected_score: (m,) rejection score (higher = not selected), or None.
        local_target: (m,) true local labels, ``num_selected`` = "not selected".
        num_selected: n.

    Returns ``{"closed_acc": accuracy on the selected samples (a rejection counts as an error),
    "open_acc": accuracy on all samples with "not selected" as a class, "auroc": AUROC of the
    score for detecting unselected samples}``.
    """
    pred = pred.detach().cpu().long()
    y = local_target.detach().cpu().long()
    sel = y < num_selected
    out = {
        "closed_acc": float((pred[sel] == y[sel]).double().mean()) if sel.any() else float("nan"),
        "open_acc": float((pred == y).double().mean()),
    }
    out["auroc"] = (auroc(not_selected_score, ~sel) if not_selected_score is not None
                    else float("nan"))
    return out
