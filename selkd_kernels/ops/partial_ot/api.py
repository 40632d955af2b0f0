r"""Open-set coupling of Selective KD: ``sk.partial_ot`` (paper 2, Eq. 12-14, Alg. 1; docs/ops/partial_ot.md, docs/backends.md).

For a batch of ``m`` samples with scores ``Z`` (m x k) the coupling is

.. math:: P^\star = \arg\min_{P \in U} \langle C, P\rangle - \varepsilon H(P), \quad
          C = -Z, \quad U = \{P \ge 0 : P 1 \le 1,\ 1^\top P 1 = \gamma\}   \qquad (12, 14)

with the entropy ``H(P) = -sum_ij P_ij (log P_ij - 1)`` (paper 2, Eq. 6), i.e. the KL projection
of ``K = exp(Z / eps)`` onto ``U``. See :mod:`selkd_kernels.ops.partial_ot.reference` for the maths of
both methods and of the gradients.

Backends (same names as Sinkhorn's): "torch" (the reference), "cpp" (``csrc/partial_ot_cpu.cpp``),
"triton" (CUDA, or CPU under ``TRITON_INTERPRET=1``). "auto" takes cpp on CPU when built, triton
on CUDA, else torch. Every backend returns ``log P`` together with the row log-masses; the
backward is the same closed form for all,
:func:`~selkd_kernels.ops.partial_ot.reference.grad_scores`.
"""
from __future__ import annotations

import torch

from ... import _validation as V
from . import reference as _ref
from .dispatch import available_backends, get_backend

METHODS = _ref.METHODS


def available_partial_ot_backends(device=None) -> list:
    """Partial-OT backends that can run here, optionally only those that run on ``device``.

    Example:
        >>> import selkd_kernels as sk
        >>> "torch" in sk.available_partial_ot_backends("cpu")   # the reference always runs
        True
    """
    return available_backends(device)


def resolve_gamma(gamma, m: int, labels=None, num_selected=None):
    """The total mass ``gamma``: a float in (0, m], or a 0-d tensor for ``gamma="labels"``.

    ``gamma`` is a number, or ``"labels"``: the number of selected samples in the batch, read from
    ``labels`` — a bool mask (True = selected) or local labels whose values in
    ``[0, num_selected)`` are the selected classes (larger values mean "not selected", ``-1`` a
    row without a label, which is an error here since it cannot be counted). The count stays a
    tensor, so no device synchronisation is needed for it; outside ``torch.compile`` tracing an
    empty selection raises ``ValueError`` (while tracing it gives a NaN coupling instead).
    """
    if isinstance(gamma, str):
        if gamma != "labels":
            raise ValueError(f"gamma must be a number in (0, {m}] or 'labels', got {gamma!r}")
        if labels is None:
            raise ValueError("labels must be given when gamma='labels' (gamma is the number of "
                             "selected samples in the batch)")
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.shape[0] != m:
            raise ValueError(f"labels must be a 1-D tensor with {m} entries, got "
                             f"{getattr(labels, 'shape', type(labels).__name__)}")
        if labels.dtype == torch.bool:
            count = labels.sum()
        else:
            if num_selected is None:
                raise ValueError("labels given as class indices need the number of selected "
                                 "classes")
            y = V.check_labels("labels", labels)
            if not torch.compiler.is_compiling() and bool((y < 0).any()):
                raise ValueError("labels has rows without a label (-1): gamma='labels' cannot "
                                 "count them; give gamma as a number")
            count = ((y >= 0) & (y < num_selected)).sum()
        if not torch.compiler.is_compiling() and int(count) == 0:
            raise ValueError(f"gamma='labels' found no selected sample in the batch, but gamma "
                             f"must be in (0, {m}]")
        return count
    if isinstance(gamma, torch.Tensor) or not V._is_real(gamma):
        raise ValueError(f"gamma must be a number in (0, {m}] or 'labels', got {gamma!r}")
    g = float(gamma)
    if not (0.0 < g <= m):  # also rejects NaN
        raise ValueError(f"gamma must be in (0, m] = (0, {m}], got {gamma!r}")
    return g


def gamma_tensor(gamma, *like: torch.Tensor) -> torch.Tensor:
    """``gamma`` (a number or a 0-d tensor) as a 0-d tensor in the compute dtype of ``like`` on
    their device. ``torch.full`` launches a fill, not a blocking host-to-device copy."""
    cd = V.compute_dtype(*like)
    dev = like[0].device
    if isinstance(gamma, torch.Tensor):
        return gamma.detach().to(device=dev, dtype=cd).reshape(())
    return torch.full((), float(gamma), dtype=cd, device=dev)


def validate_partial_ot_args(scores, eps, method, n_iters, name="scores"):
    V.check_tensor(name, scores, (2,))
    eps = V.check_positive("eps", eps)
    V.check_choice("method", method, set(METHODS))
    n_iters = V.check_positive_int("n_iters", n_iters)
    return eps, n_iters


class _PartialOTFunction(torch.autograd.Function):
    """``log P`` from a backend; backward by the closed form with the active set fixed."""

    @staticmethod
    def forward(ctx, scores, gamma, backend, eps, method, n_iters):
        log_p, l, rho, sat = backend.coupling(scores, gamma=gamma, eps=eps, method=method,
                                               n_iters=n_iters)
        ctx.params = (eps, method, n_iters)
        ctx.in_dtype = scores.dtype
        ctx.has_sat = sat is not None
        ctx.save_for_backward(log_p, l, rho, gamma, sat if sat is not None else l.new_empty(0))
        return log_p.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_log_p):
        log_p, l, rho, gamma, sat = ctx.saved_tensors
        eps, method, n_iters = ctx.params
        g = _ref.grad_scores(eps, log_p, l, rho, sat if ctx.has_sat else None, gamma,
                             method, n_iters, grad_log_p.to(log_p.dtype))
        return g.to(ctx.in_dtype), None, None, None, None, None


def partial_ot(scores: torch.Tensor, gamma, *, eps: float = 1.0, method: str = "exact",
               n_iters: int = 10, backend: str = "auto", labels=None,
               log: bool = False) -> torch.Tensor:
    r"""Partial-OT coupling of one batch (paper 2, Eq. 12-14).

    Args:
        scores: (m, k) scores ``Z`` (the negative cost ``-C`` of Eq. 13; for a classifier, its
            logits with "not selected" as the last column).
        gamma: total mass of the coupling, a number in (0, m], or ``"labels"`` (the number of
            selected samples, counted from ``labels``; paper 2: "the number of batch samples
            classified to the categories of the subtask").
        eps: entropic regularisation (> 0); ``K = exp(Z / eps)``.
        method: ``"exact"`` (default): the closed-form KL projection onto
            ``{P 1 <= 1, 1^T P 1 = gamma}``, ``P = diag(min(kappa, 1/r_i)) K``.
            ``"bregman"``: the rounds of paper 2's Alg. 1, ``n_iters`` times a row clipping
            ``P <- P / max(P 1, 1)`` followed by the rescale ``P <- P gamma / 1^T P 1``. Without a
            Dykstra correction this is not the projection (docs/ops/partial_ot.md).
        n_iters: rounds of Alg. 1 (``"bregman"`` only).
        backend: "auto", "torch", "cpp", "triton" (see the module docs).
        labels: for ``gamma="labels"``: (m,) bool mask of selected samples, or local class indices
            in ``[0, k)`` with ``k - 1`` = "not selected".
        log: return ``log P`` (finite wherever ``scores`` is) instead of ``P``.

    Returns:
        (m, k) coupling ``P`` (or ``log P``), differentiable w.r.t. ``scores``. Computation is in
        float32 (float64 for float64 input); the result has the input dtype. Rows with a NaN or
        ``+inf`` score are left out of the batch (NaN result), rows of ``-inf`` scores get no
        mass; the other rows share ``min(gamma, their number)``.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> z = torch.randn(8, 4)
        >>> P = sk.partial_ot(z, 3.0, eps=0.5)
        >>> round(float(P.sum()), 4), bool((P.sum(1) <= 1 + 1e-6).all())
        (3.0, True)
    """
    eps, n_iters = validate_partial_ot_args(scores, eps, method, n_iters)
    m, k = scores.shape
    if labels is not None:
        V.check_same_device(scores=scores, labels=labels)
        if isinstance(labels, torch.Tensor) and labels.dtype != torch.bool:
            V.check_labels("labels", labels, n=m, num_classes=k, rows_of="scores")
    gamma = resolve_gamma(gamma, m, labels, k - 1)
    log_p = partial_ot_log(scores, gamma, eps, method, n_iters,
                           get_backend(backend, scores.device))
    return log_p if log else torch.exp(log_p)


def partial_ot_log(scores, gamma, eps: float, method: str, n_iters: int, be):
    """``log P`` for validated arguments and a resolved backend object (differentiable);
    ``gamma`` a number or a 0-d tensor."""
    return _PartialOTFunction.apply(scores, gamma_tensor(gamma, scores), be, eps, method,
                                    n_iters)
