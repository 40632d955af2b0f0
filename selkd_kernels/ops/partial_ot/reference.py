r"""Pure-PyTorch reference for the open-set coupling of Selective KD (paper 2, Sec. 3.2.2; docs/ops/partial_ot.md).

Problem (paper 2, Eq. 12 and 14). For a batch of ``m`` samples with scores ``Z`` (m x k, ``Z = -C``
in the paper's notation, k = n + 1 with "not selected" last) and ``K = exp(Z / eps)``::

    P* = argmin_{P in U}  <C, P> - eps H(P),   U = { P >= 0 : P 1 <= 1,  1^T P 1 = gamma },
    H(P) = -sum_ij P_ij (log P_ij - 1)                                     (paper 2, Eq. 6)

which is the KL (Bregman) projection of ``K`` onto ``U``: ``<C,P> - eps H(P) = eps KL(P | K) +
const`` with the generalised KL ``KL(P|K) = sum P log(P/K) - P + K``.

Both methods only rescale rows. Every coupling has the form ``P = diag(s) K``, so
``log P_ij = log_softmax_j(Z_i / eps) + rho_i`` where ``rho_i = log(sum_j P_ij)`` is the row's log
mass; the whole problem reduces to a map from the row log-masses of ``K``,
``l_i = logsumexp_j(Z_ij / eps)``, to ``rho``. We always work with ``l`` and ``rho`` (never with
``K`` itself), which keeps huge and tiny scores finite in any precision.

* ``method="exact"``: the KKT conditions of the projection give ``s_i = min(kappa, 1 / r_i)``,
  ``r_i = exp(l_i)``, where ``kappa`` solves ``sum_i min(kappa r_i, 1) = gamma``. With the rows
  sorted by decreasing ``r`` and the first ``k`` of them saturated (row mass exactly 1),
  ``kappa = (gamma - k) / sum_{i > k} r_(i)``; ``k`` is the smallest count for which the largest
  unsaturated row stays at or below 1 (``kappa r_(k+1) <= 1``). In logs:
  ``log kappa = log(gamma - k) - logsumexp_{i unsaturated} l_i`` and
  ``rho_i = min(l_i + log kappa, 0)``.
* ``method="bregman"``: paper 2's Alg. 1 as written, ``n_iters`` rounds of "divide each row by
  ``max(row sum, 1)``" followed by "rescale the total mass to ``gamma``". In logs:
  ``rho <- min(rho, 0)``, ``rho <- rho + log gamma - logsumexp(rho)``, from ``rho = l``. This is
  *not* the projection (no Dykstra correction): when every row starts above 1 the first round
  makes all rows equal to 1 and the rescale leaves ``softmax(Z / eps) * gamma / m``, a fixed point.

Gradients. Both maps are piecewise smooth in ``l``; the reference lets autograd differentiate them
with the active set (which rows are saturated / clipped) held fixed, which is the exact derivative
everywhere except on the measure-zero boundaries where a row's mass is exactly 1. The same
derivative in closed form (used by the compiled backends' backward) is :func:`grad_scores`.

Open-set loss (paper 2, Eq. 14 with the 1/m normalisation of docs/ops/partial_ot.md)::

    L = -(1/m) sum_ij (Y_ij + lam * P_T,ij) log P_S,ij

with ``Y`` the one-hot labels over the k student columns, ``P_T`` the teacher's coupling (no
gradient) and ``P_S`` the student's, both from the same ``gamma`` and ``eps``.
"""
from __future__ import annotations

import math

import torch

METHODS = ("exact", "bregman")


def row_log_mass(scores: torch.Tensor, eps: float) -> torch.Tensor:
    """``l_i = logsumexp_j(Z_ij / eps)``: log of the row sums of ``K = exp(Z / eps)``."""
    return torch.logsumexp(scores / eps, dim=-1)


def exact_active_set(l: torch.Tensor, gamma: float):
    """Number ``k`` of saturated rows and the (m,) saturated mask for the exact projection.

    Sort ``l`` descending; candidate ``k`` saturates the ``k`` largest rows and gives
    ``log kappa_k = log(gamma - k) - logsumexp(l_(k..m-1))``. The answer is the first ``k`` with
    ``gamma - k > 0`` whose largest unsaturated row is not pushed above 1
    (``log kappa_k + l_(k) <= 0``). Rounding can leave no candidate passing when ``gamma = m``;
    then every row but the smallest is saturated, which is the exact answer in that case.
    """
    m = l.shape[0]
    with torch.no_grad():
        order = torch.argsort(l, descending=True, stable=True)
        s = l[order]
        suffix = torch.logcumsumexp(s.flip(0), dim=0).flip(0)
        ks = torch.arange(m, device=l.device, dtype=l.dtype)
        rem = gamma - ks
        feasible = rem > 0
        log_kappa = torch.log(rem.clamp_min(torch.finfo(l.dtype).tiny)) - suffix
        valid = feasible & (log_kappa + s <= 0)
        n_feasible = int(math.ceil(gamma)) if gamma < m else m
        k_fallback = max(n_feasible - 1, 0)
        idx = torch.nonzero(valid)
        k = int(idx[0, 0]) if idx.numel() else k_fallback
        sat = torch.zeros(m, dtype=torch.bool, device=l.device)
        sat[order[:k]] = True
    return k, sat


def rho_exact(l: torch.Tensor, gamma: float):
    """Row log-masses of the exact KL projection, differentiable with the active set fixed.

    Returns ``(rho, sat, k)``.
    """
    k, sat = exact_active_set(l.detach(), gamma)
    log_kappa = math.log(gamma - k) - torch.logsumexp(l.masked_fill(sat, float("-inf")), dim=0)
    rho = torch.where(sat, torch.zeros_like(l), l + log_kappa)
    return rho, sat, k


def rho_bregman(l: torch.Tensor, gamma: float, n_iters: int) -> torch.Tensor:
    """Row log-masses after ``n_iters`` rounds of paper 2's Alg. 1 (row clip, then rescale)."""
    log_gamma = math.log(gamma)
    rho = l
    for _ in range(n_iters):
        rho = torch.clamp(rho, max=0.0)
        rho = rho + (log_gamma - torch.logsumexp(rho, dim=0))
    return rho


def log_coupling(scores: torch.Tensor, gamma: float, eps: float, method: str = "exact",
                 n_iters: int = 10):
    """``(log P, rho, sat)`` for one batch; ``sat`` is the saturated mask (exact) or None."""
    logits = scores / eps
    l = torch.logsumexp(logits, dim=-1)
    if method == "exact":
        rho, sat, _ = rho_exact(l, gamma)
    elif method == "bregman":
        rho, sat = rho_bregman(l, gamma, n_iters), None
    else:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    log_p = torch.log_softmax(logits, dim=-1) + rho.unsqueeze(-1)
    return log_p, rho, sat


def open_set_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                  target: torch.Tensor, gamma: float, eps: float, lam: float,
                  method: str = "exact", n_iters: int = 10) -> torch.Tensor:
    """Scalar open-set SelKD loss; differentiable w.r.t. ``student_scores`` only.

    ``target`` holds local column indices in ``[0, k)`` (``k - 1`` = "not selected").
    """
    log_ps, _, _ = log_coupling(student_scores, gamma, eps, method, n_iters)
    with torch.no_grad():
        log_pt, _, _ = log_coupling(teacher_scores.detach(), gamma, eps, method, n_iters)
        p_t = torch.exp(log_pt)
    m = student_scores.shape[0]
    ce = -log_ps.gather(1, target.long().unsqueeze(1)).sum()
    kd = -(p_t * log_ps).sum()
    return (ce + lam * kd) / m


# ---- closed-form derivatives (what the compiled backends' backward computes) ------------------

def rho_vjp_exact(l, rho, sat, gamma, g):
    """``(d rho / d l)^T g`` for the exact projection with the active set ``sat`` fixed."""
    unsat = ~sat
    k = int(sat.sum())
    mass = torch.exp(rho)
    g_u = torch.where(unsat, g, torch.zeros_like(g)).sum()
    return torch.where(unsat, g - g_u * mass / (gamma - k), torch.zeros_like(g))


def rho_vjp_bregman(l, gamma, n_iters, g):
    """``(d rho / d l)^T g`` for Alg. 1, by recomputing each round's input (O(n_iters^2 m))."""
    log_gamma = math.log(gamma)
    for t in range(n_iters - 1, -1, -1):
        rho = l
        for _ in range(t):
            rho = torch.clamp(rho, max=0.0)
            rho = rho + (log_gamma - torch.logsumexp(rho, dim=0))
        a = torch.clamp(rho, max=0.0)
        q = torch.softmax(a, dim=0)
        g = g - q * g.sum()
        g = torch.where(rho <= 0, g, torch.zeros_like(g))
    return g


def grad_scores(eps, log_p, l, rho, sat, gamma, method, n_iters, grad_log_p):
    """Gradient w.r.t. the scores of a function of ``log P``, given ``G = dF/dlog P``.

    ``log P_ij = Z_ij/eps - l_i + rho_i(l)`` gives
    ``dF/dZ = (G + softmax(Z/eps) * (J^T g - g)) / eps`` with ``g_i = sum_j G_ij`` and ``J`` the
    Jacobian of ``rho`` w.r.t. ``l``.
    """
    g = grad_log_p.sum(-1)
    if method == "exact":
        jt_g = rho_vjp_exact(l, rho, sat, gamma, g)
    else:
        jt_g = rho_vjp_bregman(l, gamma, n_iters, g)
    soft = torch.exp(log_p - rho.unsqueeze(-1))
    return (grad_log_p + soft * (jt_g - g).unsqueeze(-1)) / eps
