r"""Selective knowledge distillation losses (paper 2, Sec. 3.2; docs/selective_kd.md).

A single teacher knows all N classes; a student learns only ``n`` selected ones
(``selected_classes``, in the teacher's numbering; labels are given in that numbering too).
Prediction rules, test-time ``gamma`` and metrics are in :mod:`selkd_kernels.losses.selkd_inference`.

**Closed set** (Sec. 3.2.1, Eq. 9-11 with ``U = {P 1 = 1}``). The inner problem with only the row
constraint is solved by a row softmax (Appendix B), so Eq. 10 becomes Hinton's loss restricted to
the selected classes::

    L = CE(y, z_S) + lam * tau^2 * mean_i KL(P_T,i || P_S,i),
    P_T,i = softmax(z_T,i[selected] / tau),  P_S,i = softmax(z_S,i / tau)

The teacher's softmax is taken over the selected logits only (its other classes are dropped
before normalising, not after). The CE term uses temperature 1. ``tau^2`` keeps the KD gradient's
scale independent of ``tau`` (Hinton et al., 2015); pass ``tau_squared=False`` for the paper's
literal Eq. 1. Without labels (``target=None``, e.g. an unlabelled pool) only the distillation
term is returned.

Optional ``coupling="balanced"``: the teacher target is the batch coupling with rows = samples
(mass 1 each) and columns = selected classes with mass = the batch's label counts, solved by
:func:`selkd_kernels.sinkhorn` on the per-batch cost ``M_ij = -log P_T,ij`` (nonnegative) with
``eps = 1``. Then ``K = exp(-M) = P_T``, so without the column constraint the plan is exactly the
softmax target; the column constraint redistributes the teacher's mass to match the batch's label
frequencies. Sinkhorn works with probability marginals, so both are divided by ``m``
(``a = 1/m``, ``b = counts/m``) and the plan is multiplied back by ``m`` (its rows are then
renormalised to 1, which removes the residual row-marginal error of the last iteration).

**Open set** (Sec. 3.2.2, Eq. 12-14, Alg. 1), two formulations (docs/selective_kd.md):

* ``formulation="paper"``: the student has ``n + 1`` outputs, "not selected" last. The teacher's
  open-set scores are its ``n`` selected logits followed by ``eps * logsumexp(others / eps)``, so
  ``softmax(. / eps)`` of them gives the "not selected" column exactly the teacher's total mass on
  the other classes at the coupling's temperature.
* ``formulation="consistent"``: the student has ``n`` outputs; the coupling's leftover row mass
  ``1 - sum_j P_ij`` is the probability of "not selected", and unselected samples are trained
  with ``-log(1 - sum_j P_S,ij)``. The teacher's scores are its log-probabilities of the ``n``
  selected classes at temperature ``eps`` (:func:`open_set_teacher_scores`).

With ``gamma`` the number of selected samples in the batch (``gamma="labels"``) and both couplings
from :func:`selkd_kernels.partial_ot` at the same ``eps`` the loss is
:func:`selkd_kernels.ops.partial_ot.reference.open_set_loss` (the cross-entropy of the labels and
``lam`` times the cross-entropy of the teacher's coupling, under the student's coupling, per
row, averaged over the batch). ``log P_S`` comes from the log domain, never from the log of an
underflowed coupling. Labels outside the selection map to "not selected"; labels outside
``[0, N)`` are an error. The teacher is frozen: its scores get no gradient.

Under ``torch.compile`` (also ``fullgraph=True, dynamic=True``) the whole loss traces: the label
checks that need the values are skipped while tracing, and ``gamma="labels"`` is a device tensor.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _validation as V
from ..ops.partial_ot import reference as _po_ref
from ..ops.partial_ot.api import gamma_tensor, resolve_gamma, validate_partial_ot_args
from ..ops.partial_ot.dispatch import get_backend as get_partial_ot_backend
from ..ops.registry import check_backend_name
from ..ops.sinkhorn.api import sinkhorn

FORMULATIONS = _po_ref.FORMULATIONS


# ---- labels and logits -------------------------------------------------------------------------

def check_selected(selected_classes) -> torch.Tensor:
    """``selected_classes`` as a 1-D int64 tensor of distinct non-negative class indices."""
    sel = torch.as_tensor(selected_classes)
    if sel.dim() != 1 or sel.numel() == 0 or sel.dtype.is_floating_point or sel.dtype == torch.bool:
        raise ValueError(f"selected_classes must be a non-empty 1-D sequence of class indices, "
                         f"got {selected_classes!r}")
    sel = sel.long()
    if torch.compiler.is_compiling():
        return sel  # values were checked when the module or the call site was set up
    if bool((sel < 0).any()) or sel.unique().numel() != sel.numel():
        raise ValueError(f"selected_classes must hold distinct non-negative class indices, got "
                         f"{sel.tolist()}")
    return sel


def _check_fits(sel: torch.Tensor, num_classes: int, open_set: bool) -> None:
    if torch.compiler.is_compiling():
        return
    if int(sel.max()) >= num_classes:
        raise ValueError(f"selected_classes has class {int(sel.max())} but teacher_logits has "
                         f"only {num_classes} classes")
    if open_set and sel.numel() >= num_classes:
        raise ValueError("selected_classes covers every teacher class; the open set needs at "
                         "least one unselected class")


def local_labels(target: torch.Tensor, selected_classes, *, open_set: bool,
                 num_classes: int | None = None) -> torch.Tensor:
    """Map teacher-numbered labels to the student's columns.

    Selected class ``selected_classes[j]`` becomes ``j``. Other labels become ``n`` ("not selected")
    when ``open_set``; in the closed set they are an error. With ``num_classes`` (the teacher's N)
    labels outside ``[0, N)`` raise ``ValueError`` instead of becoming "not selected".

    Example:
        >>> import torch, selkd_kernels as sk
        >>> sk.local_labels(torch.tensor([7, 3, 2, 4]), [7, 2, 4], open_set=True).tolist()
        [0, 3, 1, 2]
    """
    target = V.check_labels("target", target, num_classes=num_classes)
    sel = check_selected(selected_classes).to(target.device)
    hit = target.unsqueeze(1) == sel.unsqueeze(0)
    found = hit.any(1)
    local = hit.long().argmax(1)
    if open_set:
        return torch.where(found, local, torch.full_like(local, sel.numel()))
    if not torch.compiler.is_compiling() and not bool(found.all()):
        raise ValueError("target contains classes outside selected_classes; the closed-set "
                         "student is trained on selected classes only (use open_set=True)")
    return local


def open_set_teacher_logits(teacher_logits: torch.Tensor, selected_classes,
                            temperature: float = 1.0) -> torch.Tensor:
    """(m, n+1): the selected logits, then ``T * logsumexp(others / T)`` ("not selected").

    ``softmax(result / T)`` equals the teacher's ``softmax(z / T)`` with all unselected classes
    merged into one column. The merge is exact only at the temperature it was made for, so the
    open-set loss merges at its coupling's ``eps``. This is the teacher side of the ``"paper"``
    formulation; the ``"consistent"`` one uses :func:`open_set_teacher_scores`.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> z = torch.randn(4, 10)
        >>> merged = torch.softmax(sk.open_set_teacher_logits(z, [7, 2, 4]), 1)
        >>> torch.allclose(merged[:, 3], 1 - torch.softmax(z, 1)[:, [7, 2, 4]].sum(1))
        True
    """
    temperature = V.check_positive("temperature", temperature)
    V.check_tensor("teacher_logits", teacher_logits, (2,))
    sel = check_selected(selected_classes).to(teacher_logits.device)
    N = teacher_logits.shape[1]
    _check_fits(sel, N, open_set=True)
    is_sel = torch.zeros(N, dtype=torch.bool, device=teacher_logits.device)
    is_sel[sel] = True
    # masking instead of boolean indexing keeps the shapes static for torch.compile
    others = torch.where(is_sel, torch.full_like(teacher_logits, -math.inf),
                         teacher_logits / temperature)
    other = temperature * torch.logsumexp(others, dim=1, keepdim=True)
    return torch.cat([teacher_logits.index_select(1, sel), other], dim=1)


def open_set_teacher_scores(teacher_logits: torch.Tensor, selected_classes, *, formulation: str,
                   eps: float = 1.0) -> torch.Tensor:
    """The teacher's open-set scores for ``formulation``.

    ``"paper"``: (m, n+1), the selected logits and the merged "not selected" score
    (:func:`open_set_teacher_logits` at ``eps``). ``"consistent"``: (m, n), the teacher's
    normalised log-probabilities of the selected classes at temperature ``eps``,
    ``eps * log_softmax(z_T / eps)[:, selected]``, so that row ``i`` of ``K = exp(Z / eps)`` sums to
    the teacher's probability that sample ``i`` is selected (raw logits would make the row mass
    depend on each row's arbitrary logit offset).

    Example:
        >>> import torch, selkd_kernels as sk
        >>> z = torch.randn(4, 10)
        >>> s = sk.open_set_teacher_scores(z, [7, 2, 4], formulation="consistent", eps=2.0)
        >>> mass = torch.exp(s / 2.0).sum(1)          # row mass of K = teacher's P(selected)
        >>> torch.allclose(mass, torch.softmax(z / 2.0, 1)[:, [7, 2, 4]].sum(1))
        True
    """
    V.check_choice("formulation", formulation, set(FORMULATIONS))
    if formulation == "paper":
        return open_set_teacher_logits(teacher_logits, selected_classes, temperature=eps)
    V.check_tensor("teacher_logits", teacher_logits, (2,))
    eps = V.check_positive("eps", eps)
    sel = check_selected(selected_classes).to(teacher_logits.device)
    _check_fits(sel, teacher_logits.shape[1], open_set=True)
    return eps * torch.log_softmax(teacher_logits / eps, dim=1).index_select(1, sel)


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


def _check_pair(student_logits, teacher_logits, student_name="student_logits"):
    V.check_tensor(student_name, student_logits, (2,))
    V.check_tensor("teacher_logits", teacher_logits, (2,))
    V.check_same_device(**{student_name: student_logits, "teacher_logits": teacher_logits})
    if teacher_logits.shape[0] != student_logits.shape[0]:
        raise ValueError(f"teacher_logits has batch size {teacher_logits.shape[0]} but "
                         f"{student_name} has {student_logits.shape[0]}")


def closed_set_selkd_loss(student_logits, teacher_logits, target, selected_classes, *,
                          tau: float = 4.0, weight: float = 1.0, tau_squared: bool = True,
                          coupling: str = "softmax", sinkhorn_iters: int = 50,
                          backend: str = "auto") -> torch.Tensor:
    """Closed-set SelKD loss (module docs); ``target`` in the teacher's numbering, or None for
    the distillation term alone. The functional form of ``SelKDLoss(selected_classes)``.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> zs = torch.randn(6, 3, requires_grad=True)
        >>> loss = sk.closed_set_selkd_loss(zs, torch.randn(6, 10), torch.tensor([7, 2, 4, 4, 2, 7]),
        ...                                 [7, 2, 4])
        >>> loss.backward(); zs.grad.shape
        torch.Size([6, 3])
    """
    _check_pair(student_logits, teacher_logits)
    tau = V.check_positive("tau", tau)
    weight = V.check_nonnegative("weight", weight)
    V.check_choice("coupling", coupling, {"softmax", "balanced"})
    sel = check_selected(selected_classes)
    m, n = student_logits.shape
    if n != sel.numel():
        raise ValueError(f"student_logits has {n} classes but selected_classes has {sel.numel()}")
    _check_fits(sel, teacher_logits.shape[1], open_set=False)
    y = None
    if target is not None:
        y = local_labels(V.check_labels("target", target, n=m, rows_of="student_logits")
                         .to(student_logits.device), sel, open_set=False,
                         num_classes=teacher_logits.shape[1])
    elif coupling == "balanced":
        raise ValueError("target is needed for coupling='balanced' (the batch's label counts "
                         "are its column marginal)")
    cd = V.compute_dtype(student_logits, teacher_logits)
    zs = student_logits.to(cd)
    zt = teacher_logits.detach().index_select(1, sel.to(teacher_logits.device)).to(cd)
    log_ps = torch.log_softmax(zs / tau, dim=1)
    if coupling == "softmax":
        log_pt = torch.log_softmax(zt / tau, dim=1)
        kl = (torch.exp(log_pt) * (log_pt - log_ps)).sum(1).mean()
    else:
        p_t = balanced_teacher_coupling(zt, y, tau, n_iters=sinkhorn_iters, backend=backend)
        kl = (torch.xlogy(p_t, p_t) - p_t * log_ps).sum(1).mean()
    scale = tau * tau if tau_squared else 1.0
    loss = weight * scale * kl
    if y is not None:
        loss = F.cross_entropy(zs, y) + loss
    return loss.to(student_logits.dtype)


# ---- open set ----------------------------------------------------------------------------------

class _OpenSetLossFunction(torch.autograd.Function):
    """Loss and student gradient from one fused backend call; backward only scales."""

    @staticmethod
    def forward(ctx, student_scores, teacher_scores, target, gamma, backend, eps, lam, method,
                n_iters, formulation):
        loss, grad = backend.loss_forward(student_scores, teacher_scores, target, gamma=gamma,
                                          eps=eps, lam=lam, method=method, n_iters=n_iters,
                                          formulation=formulation)
        ctx.save_for_backward(grad)
        ctx.in_dtype = student_scores.dtype
        return loss.to(student_scores.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad * grad_loss.to(grad.dtype)).to(ctx.in_dtype), *([None] * 9)


def open_set_selkd_loss(student_scores, teacher_scores, target, *, gamma="labels",
                        eps: float = 1.0, weight: float = 1.0, method: str = "exact",
                        n_iters: int = 10, backend: str = "auto",
                        formulation: str = "paper") -> torch.Tensor:
    r"""Open-set SelKD loss (paper 2, Eq. 14) on scores already in the student's column space.

    .. math:: L = -\frac1m \sum_i \Big[\sum_j (Y_{ij} + \lambda P^T_{ij}) \log P^S_{ij}
              + [\text{consistent}]\,(Y_{i,n} + \lambda(1 - \textstyle\sum_j P^T_{ij}))
              \log(1 - \textstyle\sum_j P^S_{ij})\Big]

    with ``P^S``, ``P^T`` the partial-OT couplings (Eq. 12-14) of the student's and the teacher's
    scores (docs/selective_kd.md; ``log(1 - row mass)`` is floored, see
    :mod:`selkd_kernels.ops.partial_ot.reference`).

    Args:
        student_scores: (m, k) student scores: ``k = n + 1`` with "not selected" last
            (``formulation="paper"``) or ``k = n`` (``"consistent"``).
        teacher_scores: (m, k) teacher scores (:func:`open_set_teacher_scores`).
        target: (m,) local labels in ``[0, n]``, ``n`` = "not selected"; or None (no labels:
            the distillation term alone; ``gamma`` must then be a number).
        gamma: total coupling mass, a number in (0, m] or ``"labels"`` (the selected count).
        eps, method, n_iters, backend: as in :func:`selkd_kernels.partial_ot`.
        weight: ``lam`` of Eq. 14.
        formulation: ``"paper"`` or ``"consistent"`` (module docs).

    Example:
        >>> import torch, selkd_kernels as sk
        >>> zs = torch.randn(8, 4, requires_grad=True)   # 3 selected classes, "not selected"
        >>> zt = torch.randn(8, 4)
        >>> y = torch.tensor([0, 1, 2, 3, 3, 0, 1, 3])
        >>> sk.open_set_selkd_loss(zs, zt, y, gamma="labels", backend="torch").backward()
    """
    V.check_choice("formulation", formulation, set(FORMULATIONS))
    eps, n_iters = validate_partial_ot_args(student_scores, eps, method, n_iters,
                                            name="student_scores")
    V.check_tensor("teacher_scores", teacher_scores, (2,))
    V.check_same_device(student_scores=student_scores, teacher_scores=teacher_scores,
                        target=target if isinstance(target, torch.Tensor) else None)
    if teacher_scores.shape != student_scores.shape:
        raise ValueError(f"teacher_scores must have shape {tuple(student_scores.shape)} like "
                         f"student_scores, got {tuple(teacher_scores.shape)}")
    m, k = student_scores.shape
    n = k - _po_ref.not_selected_columns(formulation)
    weight = V.check_nonnegative("weight", weight)
    if target is None:
        if isinstance(gamma, str):
            raise ValueError("gamma must be a number when target is None (there are no labels "
                             "to count the selected samples from)")
        y = torch.full((m,), -1, dtype=torch.long, device=student_scores.device)
    else:
        y = V.check_labels("target", target, n=m, num_classes=n + 1, rows_of="student_scores")
    gamma = resolve_gamma(gamma, m, y, n)
    be = get_partial_ot_backend(backend, student_scores.device)
    g = gamma_tensor(gamma, student_scores, teacher_scores)
    return _OpenSetLossFunction.apply(student_scores, teacher_scores.detach(), y, g, be, eps,
                                      float(weight), method, n_iters, formulation)


# ---- functional and module ---------------------------------------------------------------------

def selkd_loss(student_logits, teacher_logits, target, selected_classes, *, open_set=False,
               tau: float = 4.0, weight: float = 1.0, tau_squared: bool = True,
               coupling: str = "softmax", sinkhorn_iters: int = 50, eps: float = 1.0,
               gamma="labels", method: str = "exact", n_iters: int = 10,
               backend: str = "auto", formulation: str = "paper") -> torch.Tensor:
    """Selective KD loss (paper 2, Eq. 10 closed set / Eq. 14 open set).

    Args:
        student_logits: (m, n) closed set or ``formulation="consistent"``, (m, n+1) for the
            ``"paper"`` open set ("not selected" last).
        teacher_logits: (m, N) full teacher logits (frozen).
        target: (m,) labels in the teacher's numbering ``[0, N)``, or None (unlabelled batch:
            the distillation term alone; in the open set ``gamma`` must then be a number).
        selected_classes: the n selected teacher classes; column j of the student is class
            ``selected_classes[j]``.
        open_set: which variant.
        tau, tau_squared, coupling, sinkhorn_iters: closed set (module docs).
        eps, gamma, method, n_iters, formulation: open set; see :func:`open_set_selkd_loss`.
        weight: ``lam``, the weight of the distillation term.
        backend: kernels for the partial-OT coupling (open set) or the Sinkhorn solve
            (balanced closed set).

    Example:
        >>> import torch, selkd_kernels as sk
        >>> zt = torch.randn(6, 10)                       # teacher knows 10 classes
        >>> zs = torch.randn(6, 3, requires_grad=True)    # student: classes 7, 2, 4
        >>> y = torch.tensor([7, 2, 4, 4, 2, 7])
        >>> sk.selkd_loss(zs, zt, y, [7, 2, 4], tau=4.0).backward()
    """
    if not open_set:
        return closed_set_selkd_loss(student_logits, teacher_logits, target, selected_classes,
                                     tau=tau, weight=weight, tau_squared=tau_squared,
                                     coupling=coupling, sinkhorn_iters=sinkhorn_iters,
                                     backend=backend)
    V.check_choice("formulation", formulation, set(FORMULATIONS))
    _check_pair(student_logits, teacher_logits)
    eps = V.check_positive("eps", eps)
    sel = check_selected(selected_classes)
    want = sel.numel() + _po_ref.not_selected_columns(formulation)
    if student_logits.shape[1] != want:
        raise ValueError(f"student_logits must have {want} columns in the open set with "
                         f"formulation={formulation!r} (n = {sel.numel()} selected classes"
                         f"{', then not selected' if formulation == 'paper' else ''}), got "
                         f"{student_logits.shape[1]}")
    zt = open_set_teacher_scores(teacher_logits.detach(), sel, formulation=formulation, eps=eps)
    y = None
    if target is not None:
        y = local_labels(V.check_labels("target", target, n=student_logits.shape[0],
                                        rows_of="student_logits").to(student_logits.device),
                         sel, open_set=True, num_classes=teacher_logits.shape[1])
    return open_set_selkd_loss(student_logits, zt, y, gamma=gamma, eps=eps, weight=weight,
                               method=method, n_iters=n_iters, backend=backend,
                               formulation=formulation)


class SelKDLoss(torch.nn.Module):
    r"""Selective KD objective as a module (paper 2, Eq. 10 / Eq. 14).

    ``SelKDLoss(selected_classes, open_set=False, ...)``; ``forward(student_logits,
    teacher_logits, target=None)`` with the full (m, N) teacher logits and teacher-numbered labels.
    See :func:`selkd_loss` for the arguments and the module docs for the maths; compose it with a
    feature term through :class:`selkd_kernels.CombinedLoss`.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> crit = sk.SelKDLoss([7, 2, 4], open_set=True, formulation="consistent")
        >>> zs = torch.randn(6, crit.num_outputs, requires_grad=True)
        >>> crit(zs, torch.randn(6, 10), torch.tensor([7, 0, 2, 9, 4, 7])).backward()
    """

    def __init__(self, selected_classes, open_set: bool = False, *, tau: float = 4.0,
                 weight: float = 1.0, tau_squared: bool = True, coupling: str = "softmax",
                 sinkhorn_iters: int = 50, eps: float = 1.0, gamma="labels",
                 method: str = "exact", n_iters: int = 10, backend: str = "auto",
                 formulation: str = "paper"):
        super().__init__()
        self.register_buffer("selected_classes", check_selected(selected_classes).clone())
        self.open_set = bool(open_set)
        self.tau = V.check_positive("tau", tau)
        self.weight = V.check_nonnegative("weight", weight)
        self.tau_squared = bool(tau_squared)
        self.coupling = V.check_choice("coupling", coupling, {"softmax", "balanced"})
        self.sinkhorn_iters = V.check_positive_int("sinkhorn_iters", sinkhorn_iters)
        self.eps = V.check_positive("eps", eps)
        if isinstance(gamma, str):
            V.check_choice("gamma", gamma, {"labels"})
        else:
            V.check_positive("gamma", gamma)
        self.gamma = gamma
        self.method = V.check_choice("method", method, set(_po_ref.METHODS))
        self.n_iters = V.check_positive_int("n_iters", n_iters)
        self.backend = check_backend_name(backend)
        self.formulation = V.check_choice("formulation", formulation, set(FORMULATIONS))

    @property
    def num_outputs(self) -> int:
        """Student outputs expected: n (closed set, consistent open set) or n + 1 (paper's
        open set)."""
        extra = _po_ref.not_selected_columns(self.formulation) if self.open_set else 0
        return self.selected_classes.numel() + extra

    def forward(self, student_logits, teacher_logits, target=None):
        return selkd_loss(student_logits, teacher_logits, target, self.selected_classes,
                          open_set=self.open_set, tau=self.tau, weight=self.weight,
                          tau_squared=self.tau_squared, coupling=self.coupling,
                          sinkhorn_iters=self.sinkhorn_iters, eps=self.eps, gamma=self.gamma,
                          method=self.method, n_iters=self.n_iters, backend=self.backend,
                          formulation=self.formulation)

    def extra_repr(self):
        common = (f"n={self.selected_classes.numel()}, open_set={self.open_set}, "
                  f"weight={self.weight}")
        if self.open_set:
            return (f"{common}, formulation={self.formulation!r}, eps={self.eps}, "
                    f"gamma={self.gamma!r}, method={self.method!r}")
        return f"{common}, tau={self.tau}, coupling={self.coupling!r}"
