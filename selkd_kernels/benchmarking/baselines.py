"""Baselines written the way a PyTorch or POT user would write them without this package.

They solve exactly the problems of :mod:`selkd_kernels.ops.sinkhorn.reference` and
:mod:`selkd_kernels.ops.partial_ot.reference` (same iteration order, same starting point, same
reported value), so a timing ratio against them compares implementations, not problems. The loss uses the primal identity of docs/ops/sinkhorn.md,
``<alpha, r> + <beta, b> - eps * sum(r)``, which is the entropic objective of the final plan.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch

from ..ops.sinkhorn.reference import STANDARD_DOMAIN_MAX_RANGE


def scaling_is_safe(cost: torch.Tensor, eps: float) -> bool:
    """Whether exp(-M/eps) and the scalings built from it stay well inside the dtype's range:
    the reference's own standard-domain bound, applied to max|M| because a plain loop does not
    shift the cost by its minimum."""
    limit = STANDARD_DOMAIN_MAX_RANGE.get(cost.dtype, STANDARD_DOMAIN_MAX_RANGE[torch.float32])
    return float(cost.abs().max()) / eps <= limit


def plain_scaling_sinkhorn(a, b, cost, eps: float, n_iters: int) -> torch.Tensor:
    """Matrix-product Sinkhorn: ``u = a / (v K^T)``, ``v = b / (u K)``; returns the (B,) loss."""
    K = torch.exp(-cost / eps)
    u = torch.ones_like(a)
    v = torch.ones_like(b)
    for _ in range(n_iters):
        u = a / (v @ K.T)
        v = b / (u @ K)
    r = u * (v @ K.T)
    alpha = eps * torch.log(u)
    beta = eps * torch.log(v)
    return (alpha * r).sum(-1) + (beta * b).sum(-1) - eps * r.sum(-1)


def plain_log_sinkhorn(a, b, cost, eps: float, n_iters: int) -> torch.Tensor:
    """Log-domain Sinkhorn with two ``torch.logsumexp`` per iteration; returns the (B,) loss."""
    Ms = cost / eps
    log_a, log_b = torch.log(a), torch.log(b)
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for _ in range(n_iters):
        f = log_a - torch.logsumexp(g[:, None, :] - Ms, dim=-1)
        g = log_b - torch.logsumexp(f[:, :, None] - Ms, dim=-2)
    r = torch.exp(f + torch.logsumexp(g[:, None, :] - Ms, dim=-1))
    return eps * ((f * r).sum(-1) + (g * b).sum(-1) - r.sum(-1))


def plain_kd_loss(student_logits, teacher_logits, cost, tau: float, eps: float, n_iters: int,
                  domain: str) -> torch.Tensor:
    """Mean Sinkhorn KD loss; autograd differentiates through every iteration."""
    a = torch.softmax(teacher_logits / tau, dim=-1)
    b = torch.softmax(student_logits / tau, dim=-1)
    solve = plain_scaling_sinkhorn if domain == "scaling" else plain_log_sinkhorn
    return solve(a, b, cost, eps, n_iters).mean()


# ----------------------------------------------------------------------------- POT

def pot_batch_rows(a, b, cost, eps: float, n_iters: int, log_domain: bool, grad: str):
    """(B,) loss from ``ot.batch.solve_batch``.

    ``tol=0`` makes POT run exactly ``n_iters`` iterations. Its iteration order (source scaling
    first) and starting point match the reference. Its ``value`` is ``<T,M> + eps sum T log T``;
    the package's objective also has the ``-eps sum(T)`` term of H(T) = -sum T (log T - 1).
    """
    import ot.batch

    B = a.shape[0]
    M = cost.expand(B, *cost.shape) if cost.dim() == 2 else cost
    res = ot.batch.solve_batch(M, reg=eps, a=a, b=b, max_iter=n_iters, tol=0.0,
                               method="log_sinkhorn" if log_domain else "sinkhorn", grad=grad)
    return res.value - eps * res.plan.sum(dim=(1, 2))


def pot_loop_rows(a_np: np.ndarray, b_np: np.ndarray, cost_t_np: np.ndarray, eps: float,
                  n_iters: int, log_domain: bool) -> np.ndarray:
    """(B,) loss from ``ot.sinkhorn`` called once per problem.

    POT scales its target first; passing (b, a, M^T) makes that the package's source update, so the
    iterates are the reference's and the returned plan is the transposed reference plan.
    """
    import ot

    method = "sinkhorn_log" if log_domain else "sinkhorn"
    out = np.empty(a_np.shape[0], dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(a_np.shape[0]):
            T = ot.sinkhorn(b_np[i], a_np[i], cost_t_np, eps, method=method,
                            numItermax=n_iters, stopThr=0.0, warn=False)
            logT = np.log(np.where(T > 0, T, 1.0))
            out[i] = float((T * cost_t_np).sum() + eps * (T * logT).sum() - eps * T.sum())
    return out


# ----------------------------------------------------------------------------- partial OT (docs/ops/partial_ot.md)

def plain_partial_exact(scores, gamma: float, eps: float) -> torch.Tensor:
    """Exact KL projection of exp(Z/eps) onto {P 1 <= 1, 1^T P 1 = gamma} by the sorted closed form.

    ``s_i = min(kappa, 1/r_i)`` with k saturated rows and ``kappa = (gamma - k) / (sum of the other
    r)``; the shift by max(Z/eps) cancels between K and kappa.
    """
    logK = scores / eps
    K = torch.exp(logK - logK.max())
    r = K.sum(-1)
    m = r.shape[0]
    if gamma >= m:
        return K / r[:, None]
    rs, _ = torch.sort(r, descending=True)
    tail = torch.flip(torch.cumsum(torch.flip(rs, [0]), 0), [0])
    k = torch.arange(m, device=r.device, dtype=r.dtype)
    kappa = (gamma - k) / tail
    prev = torch.cat([rs.new_full((1,), float("inf")), rs[:-1]])
    valid = (kappa * rs <= 1) & (kappa * prev >= 1)
    kstar = torch.argmax(valid.to(torch.int8))
    s = torch.minimum(kappa[kstar], 1.0 / r)
    return s[:, None] * K


def plain_partial_bregman(scores, gamma: float, eps: float, n_rounds: int) -> torch.Tensor:
    """Paper 2's Alg. 1 as printed: cap every row sum at 1, then rescale to total mass gamma."""
    P = torch.exp(scores / eps)
    for _ in range(n_rounds):
        P = P / P.sum(-1, keepdim=True).clamp_min(1.0)
        P = P * (gamma / P.sum())
    return P


def plain_open_set_loss(coupling, student_scores, teacher_scores, target,
                        weight: float) -> torch.Tensor:
    """Open-set SelKD loss (paper 2, Eq. 14), ``(CE(Y | P_S) - weight * sum P_T log P_S) / m``, with
    ``log P_S`` taken of the coupling itself, as a user without a log-domain coupling would."""
    with torch.no_grad():
        P_t = coupling(teacher_scores)
    log_ps = torch.log(coupling(student_scores))
    ce = -log_ps.gather(1, target.long().unsqueeze(1)).sum()
    kd = -(P_t * log_ps).sum()
    return (ce + weight * kd) / student_scores.shape[0]
