r"""Sinkhorn knowledge-distillation loss (paper 1, Eq. 10-12; docs/ops/sinkhorn.md, docs/losses.md).

For each row, ``p_T = softmax(z_T / tau)`` over the teacher's C_T classes, ``p_S = softmax(z_S / tau)``
over the student's C_S classes and the loss is the Sinkhorn distance ``S_eps(p_T, p_S)`` with the
(C_T, C_S) cost ``M`` (teacher = source ``a``, student = target ``b``).

Gradients (envelope theorem, paper 1 Prop. 4.2 / Eq. 14-15, docs/ops/sinkhorn.md), from the converged potentials::

    dS/dz_S = (beta  - <beta,  p_S>) * p_S / tau
    dS/dz_T = (alpha - <alpha, p_T>) * p_T / tau
    dS/dM   = T = exp((alpha_i + beta_j - M_ij) / eps)

The backend's fused forward returns the loss together with the logit gradients; backward only
scales them by the incoming gradient, so memory does not grow with the iteration count. With
``grad="unrolled"`` the reference iterations are differentiated by autograd instead (for comparison:
exact for the truncated iteration, memory linear in ``n_iters``).

Second derivatives. The envelope gradient is a number, not a formula autograd can differentiate
again. A backward with ``create_graph=True`` (gradient penalties, Hessian-vector products)
therefore recomputes the gradient by differentiating the torch reference's iterations, exactly as
``grad="unrolled"`` does, whatever backend ran the forward: the first derivative is then the
unrolled one (equal to the envelope gradient once the iteration has converged) and its own
derivative is exact for the truncated iteration, so the second-order part is never silently
dropped. Memory of that backward grows with the iterations run.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import _validation as V
from ..ops.registry import check_backend_name
from ..ops.sinkhorn import reference as _ref
from ..ops.sinkhorn.dispatch import describe, get_backend

_REDUCTIONS = {"mean", "sum", "none"}


class SinkhornKDFunction(torch.autograd.Function):
    """Loss rows whose backward scales the envelope gradients of a fused forward that already ran
    (or, with ``create_graph=True``, differentiates the unrolled reference: module docs).

    The backend runs outside this function (:func:`kd_rows`): a compiled op called inside an
    autograd.Function's forward is traced as a subgraph, and ``torch.compile(dynamic=True)`` of
    two such calls on one student (multi-teacher) failed inside Dynamo (torch 2.13)."""

    @staticmethod
    def forward(ctx, student_logits, teacher_logits, cost, loss, grad_student, grad_teacher,
                alpha, beta, options):
        ctx.options = options
        ctx.dtypes = (student_logits.dtype, teacher_logits.dtype, cost.dtype)
        ctx.save_for_backward(student_logits, teacher_logits, cost, grad_student, grad_teacher,
                              alpha, beta)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        z_s, z_t, cost, g_s, g_t, alpha, beta = ctx.saved_tensors
        none = (None,) * 6
        if torch.is_grad_enabled():  # create_graph=True: the gradient needs a graph of its own
            grads = _ref.unrolled_gradients(lambda s, t, c: _unrolled_solve(s, t, c, **ctx.options),
                                    (z_s, z_t, cost), ctx.needs_input_grad[:3], grad_loss)
            return (*grads,) + none
        w = grad_loss.to(g_s.dtype)  # (B,) per-row weights
        grad_student = (g_s * w.unsqueeze(-1)).to(ctx.dtypes[0])
        grad_teacher = None if g_t is None else (g_t * w.unsqueeze(-1)).to(ctx.dtypes[1])
        grad_cost = None
        if alpha is not None:
            grad_cost = _ref.cost_gradient(alpha, beta, cost.to(alpha.dtype), ctx.options["eps"],
                                           w).to(ctx.dtypes[2])
        return (grad_student, grad_teacher, grad_cost) + none


def kd_rows(student_logits, teacher_logits, cost, backend, tau, eps, n_iters, tol, check_every,
            method):
    """Per-row KD losses from ``backend``'s fused forward, differentiable by the envelope
    gradients; returns ``(rows, iters, err)``. Inputs validated by the caller."""
    grad = torch.is_grad_enabled()
    want_teacher = grad and teacher_logits.requires_grad
    want_cost = grad and cost.requires_grad
    with torch.no_grad():
        out = backend.kd_forward(student_logits.detach(), teacher_logits.detach(), cost.detach(),
                                 tau=tau, eps=eps, n_iters=n_iters, tol=tol,
                                 check_every=check_every, teacher_grad=want_teacher,
                                 method=method)
    options = dict(tau=tau, eps=eps, n_iters=n_iters, tol=tol, check_every=check_every,
                   method=method)
    rows = SinkhornKDFunction.apply(student_logits, teacher_logits, cost, out.loss,
                                    out.grad_student, out.grad_teacher if want_teacher else None,
                                    out.alpha if want_cost else None,
                                    out.beta if want_cost else None, options)
    return rows, out.iters, out.err


def _unrolled_solve(student_logits, teacher_logits, cost, *, tau, eps, n_iters, tol, check_every,
                    method):
    """The torch reference on the KD problem, differentiable by autograd (``grad="unrolled"``)."""
    cd = V.compute_dtype(student_logits, teacher_logits, cost)
    p_t = torch.softmax(teacher_logits.to(cd) / tau, dim=-1)
    p_s = torch.softmax(student_logits.to(cd) / tau, dim=-1)
    return _ref.solve(p_t, p_s, cost.to(cd), eps=eps, n_iters=n_iters, tol=tol,
                      check_every=check_every, method=method)


def validate_kd_inputs(student_logits, teacher_logits, cost, tau, eps, n_iters, tol, check_every,
                       reduction):
    V.check_ot_shapes(teacher_logits, student_logits, cost, a_name="teacher_logits",
                      b_name="student_logits", cost_name="cost")
    cd = V.compute_dtype(student_logits, teacher_logits, cost)
    return (V.check_representable("tau", tau, cd), V.check_representable("eps", eps, cd),
            V.check_positive_int("n_iters", n_iters), V.check_optional_positive("tol", tol),
            V.check_positive_int("check_every", check_every),
            V.check_choice("reduction", reduction, _REDUCTIONS))


def _reduce(rows, reduction):
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    return rows


def plus_cross_entropy(loss, student_logits, target):
    """``loss + CE(target, student_logits)`` (paper 1, Eq. 11), or ``loss`` when ``target`` is
    None: the supervised term every distillation module adds."""
    if target is None:
        return loss
    target = V.check_labels("target", target, n=student_logits.shape[0],
                            num_classes=student_logits.shape[1], rows_of="student_logits")
    return loss + F.cross_entropy(student_logits, target)


def sinkhorn_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     cost: torch.Tensor, *, tau: float = 3.0, eps: float = 0.1,
                     n_iters: int = 100, tol: Optional[float] = None, check_every: int = 10,
                     reduction: str = "mean", backend: str = "auto", grad: str = "envelope",
                     method: str = "auto", return_stats: bool = False):
    r"""Sinkhorn distance between teacher and student temperature softmaxes (paper 1, Eq. 12).

    Args:
        student_logits: (B, C_S) student logits ``z_S``.
        teacher_logits: (B, C_T) teacher logits ``z_T``; gets a gradient only if it requires one.
        cost: (C_T, C_S) ground cost shared by the batch (see :mod:`selkd_kernels.cost`), or
            (B, C_T, C_S) per row. Gets the gradient ``sum_i T_i`` if it requires one.
        tau: softmax temperature (Eq. 10).
        eps: entropic regularisation.
        n_iters, tol, check_every, method: as in :func:`selkd_kernels.sinkhorn`.
        reduction: "mean" (Eq. 11), "sum" or "none" (per-row losses).
        backend: see :mod:`selkd_kernels.ops.sinkhorn.dispatch`.
        grad: "envelope" (docs/ops/sinkhorn.md, the default) or "unrolled" (autograd through the reference
            iterations; always runs the torch reference).
        return_stats: also return ``(iters, err)`` per row.

    The loss has the student logits' dtype; computation is in float32 (float64 for float64 input).

    Example:
        >>> import torch, selkd_kernels as sk
        >>> cost = sk.cost.euclidean_cost(torch.randn(7, 16), torch.randn(5, 16))  # (C_T, C_S)
        >>> student = torch.randn(4, 5, requires_grad=True)
        >>> teacher = torch.randn(4, 7)
        >>> loss = sk.sinkhorn_kd_loss(student, teacher, cost, tau=3.0, eps=0.1)
        >>> loss.backward()
        >>> tuple(loss.shape), tuple(student.grad.shape)
        ((), (4, 5))
        >>> per_row = sk.sinkhorn_kd_loss(student, teacher, cost, reduction="none")
        >>> bool(torch.allclose(per_row.mean(), loss))
        True
    """
    tau, eps, n_iters, tol, check_every, reduction = validate_kd_inputs(
        student_logits, teacher_logits, cost, tau, eps, n_iters, tol, check_every, reduction)
    V.check_choice("grad", grad, {"envelope", "unrolled"})
    V.check_choice("method", method, {"auto", "log", "standard"})
    if grad == "unrolled":
        out = _unrolled_solve(student_logits, teacher_logits, cost, tau=tau, eps=eps,
                              n_iters=n_iters, tol=tol, check_every=check_every, method=method)
        rows, iters, err = out.loss, out.iters, out.err.detach()
    else:
        be = get_backend(backend, student_logits.device,
                         describe(teacher_logits, student_logits, cost, method=method,
                                  n_iters=n_iters, kd=True))
        rows, iters, err = kd_rows(student_logits, teacher_logits, cost, be, tau, eps, n_iters,
                                   tol, check_every, method)
    loss = _reduce(rows, reduction).to(student_logits.dtype)
    return (loss, (iters, err)) if return_stats else loss


class SinkhornKDLoss(torch.nn.Module):
    r"""Cross-task distillation objective (paper 1, Eq. 11)::

        L = CE(y, z_S) + weight * mean_i S_eps(softmax(z_T,i / tau), softmax(z_S,i / tau))

    Paper defaults: ``tau=3``, ``eps=0.1``, ``weight`` 10 (CIFAR-100) or 100 (CUB). Works unchanged
    when teacher and student share classes (then use e.g. :func:`selkd_kernels.cost.constant_cost`
    or the Euclidean cost of the shared class centres).

    Args:
        cost: (C_T, C_S) cost matrix; stored as a buffer (moves with ``.to(device)``).
        tau, eps, weight, n_iters, tol, check_every, backend, grad: see :func:`sinkhorn_kd_loss`.

    ``forward(student_logits, teacher_logits, target=None)`` returns ``weight * S`` (mean over the
    batch), plus ``cross_entropy(student_logits, target)`` when ``target`` is given. The last call's
    per-row iterations and marginal errors are kept in ``last_iters`` / ``last_err``.

    Example:
        >>> import torch, torch.nn.functional as F, selkd_kernels as sk
        >>> cost = sk.cost.euclidean_cost(torch.randn(7, 16), torch.randn(5, 16))
        >>> kd = sk.SinkhornKDLoss(cost, tau=3.0, eps=0.1, weight=10.0)
        >>> student = torch.randn(4, 5, requires_grad=True)
        >>> teacher, y = torch.randn(4, 7), torch.tensor([0, 1, 2, 4])
        >>> loss = kd(student, teacher, y)         # CE + weight * Sinkhorn term
        >>> loss.backward()
        >>> with torch.no_grad():
        ...     ot_only = kd(student, teacher)
        ...     ce = F.cross_entropy(student, y)
        >>> bool(torch.allclose(loss, ce + ot_only))
        True
    """

    def __init__(self, cost: torch.Tensor, tau: float = 3.0, eps: float = 0.1,
                 weight: float = 10.0, n_iters: int = 100, tol: Optional[float] = None,
                 check_every: int = 10, backend: str = "auto", grad: str = "envelope"):
        super().__init__()
        V.check_tensor("cost", cost, (2,))
        # the widest compute dtype here; each call checks again against its own
        self.tau = V.check_representable("tau", tau, torch.float64)
        self.eps = V.check_representable("eps", eps, torch.float64)
        self.weight = V.check_nonnegative("weight", weight)
        self.n_iters = V.check_positive_int("n_iters", n_iters)
        self.tol = V.check_optional_positive("tol", tol)
        self.check_every = V.check_positive_int("check_every", check_every)
        self.backend = check_backend_name(backend)
        self.grad = V.check_choice("grad", grad, {"envelope", "unrolled"})
        self.register_buffer("cost", cost.detach().clone())
        self.last_iters: Optional[torch.Tensor] = None
        self.last_err: Optional[torch.Tensor] = None

    def forward(self, student_logits, teacher_logits, target=None):
        s, (iters, err) = sinkhorn_kd_loss(
            student_logits, teacher_logits, self.cost, tau=self.tau, eps=self.eps,
            n_iters=self.n_iters, tol=self.tol, check_every=self.check_every, reduction="mean",
            backend=self.backend, grad=self.grad, return_stats=True)
        self.last_iters, self.last_err = iters, err
        return plus_cross_entropy(self.weight * s, student_logits, target)

    def extra_repr(self):
        C_T, C_S = self.cost.shape
        return (f"C_T={C_T}, C_S={C_S}, tau={self.tau}, eps={self.eps}, weight={self.weight}, "
                f"n_iters={self.n_iters}, tol={self.tol}, backend={self.backend!r}")
