r"""Pure-PyTorch reference for the open-set coupling of Selective KD (paper 2, Sec. 3.2.2;
docs/ops/partial_ot.md, docs/selective_kd.md).

Problem (paper 2, Eq. 12 and 14). For a batch of ``m`` samples with scores ``Z`` (m x k, ``Z = -C``
in the paper's notation) and ``K = exp(Z / eps)``::

    P* = argmin_{P in U}  <C, P> - eps H(P),   U = { P >= 0 : P 1 <= 1,  1^T P 1 = gamma },
    H(P) = -sum_ij P_ij (log P_ij - 1)                                     (paper 2, Eq. 6)

which is the KL (Bregman) projection of ``K`` onto ``U``: ``<C,P> - eps H(P) = eps KL(P | K) +
const`` with the generalised KL ``KL(P|K) = sum P log(P/K) - P + K``.

Both methods only rescale rows. Every coupling has the form ``P = diag(s) K``, so
``log P_ij = log_softmax_j(Z_i / eps) + rho_i`` where ``rho_i = log(sum_j P_ij)`` is the row's log
mass; the whole problem reduces to a map from the row log-masses of ``K``,
``l_i = logsumexp_j(Z_ij / eps)``, to ``rho``. We always work with ``l`` and ``rho`` (never with
``K`` itself), and every comparison and sum of the solve is taken relative to a row of the batch
(``l_j - l_i``), so huge and tiny scores stay finite and the total mass stays ``gamma`` in any
precision.

* ``method="exact"``: the KKT conditions of the projection give ``s_i = min(kappa, 1 / r_i)``,
  ``r_i = exp(l_i)``, where ``kappa`` solves ``sum_i min(kappa r_i, 1) = gamma``. With the rows
  sorted by decreasing ``r`` and the first ``k`` of them saturated (row mass exactly 1),
  ``kappa = (gamma - k) / sum_{i >= k} r_(i)``; ``k`` is the smallest count for which the largest
  unsaturated row stays at or below 1 (``kappa r_(k) <= 1``). When rounding leaves no count
  passing (possible only for ``gamma`` equal to the number of rows), ``k = ceil(gamma) - 1``
  (:func:`fallback_saturated`, the one formula every backend uses).
* ``method="bregman"``: paper 2's Alg. 1, ``n_iters`` rounds of "divide each row by
  ``max(row sum, 1)``" followed by "rescale the total mass to ``gamma``", applied to the student's
  and the teacher's coupling alike. In logs: ``rho <- min(rho, 0)``,
  ``rho <- rho + log gamma - logsumexp(rho)``, from ``rho = l``. This is *not* the projection (no
  Dykstra correction): when every row starts above 1 the first round makes all rows equal to 1
  and the rescale leaves ``softmax(Z / eps) * gamma / m``, a fixed point. Its rows may end above
  mass 1 (the rescale comes last).

Rows that cannot carry mass. A row with a NaN or ``+inf`` score has ``l_i = NaN``; a row whose
scores are all ``-inf`` has ``l_i = -inf`` (zero mass in ``K``). Both are left out of the batch
coupling: the other rows are solved as if they were absent, with total mass
``min(gamma, number of finite rows)``; NaN rows get ``rho = NaN`` (their ``log P`` is NaN) and
``-inf`` rows ``rho = -inf`` (``P = 0``). When no row is finite (or ``gamma <= 0``, which only a
traced ``gamma="labels"`` can produce) every ``rho`` is NaN.

Everything here is written with tensor operations only (no ``.item()``, no data-dependent Python
branch), so ``torch.compile(fullgraph=True, dynamic=True)`` can trace it, and ``gamma`` may be a
Python number or a 0-d tensor.

Gradients. Both maps are piecewise smooth in ``l``; the reference lets autograd differentiate them
with the active set (which rows are saturated / clipped) held fixed, which is the exact derivative
everywhere except on the measure-zero boundaries where a row's mass is exactly 1. The same
derivative in closed form (what every backend's backward computes) is :func:`grad_scores`; the
Alg. 1 backward walks back through the stored round inputs (:func:`bregman_trajectory`).

Open-set losses (paper 2, Eq. 14 with a 1/m normalisation), both formulations of
docs/selective_kd.md, for ``Y`` the one-hot labels (rows with label ``-1`` carry none)::

    "paper"       k = n + 1 columns ("not selected" last):
                  L = -(1/m) sum_ij (Y_ij + lam P_T,ij) log P_S,ij
    "consistent"  k = n columns, the leftover row mass 1 - sum_j P_ij means "not selected"
                  (label n):
                  L = -(1/m) sum_i [ sum_j (Y_ij + lam P_T,ij) log P_S,ij
                                     + (Y_i,n + lam (1 - sum_j P_T,ij)) log(1 - sum_j P_S,ij) ]

``P_T`` is the teacher's coupling (no gradient), ``P_S`` the student's, both from the same
``gamma`` and ``eps``. ``log(1 - row mass)`` is floored at ``log(NOT_SELECTED_FLOOR)``: a
saturated row (mass exactly 1) would otherwise give an infinite loss; the floor gives it a finite
loss and, like the saturation itself, no gradient.
"""
from __future__ import annotations

import math

import torch

METHODS = ("exact", "bregman")
FORMULATIONS = ("paper", "consistent")
# The integer codes the compiled backends (C++ ops, Triton constexprs) take for them.
METHOD_CODE = {"exact": 0, "bregman": 1}
FORMULATION_CODE = {"paper": 0, "consistent": 1}
# Smallest "not selected" probability 1 - sum_j P_ij the consistent loss takes the log of.
NOT_SELECTED_FLOOR = 1e-6


def not_selected_columns(formulation) -> int:
    """Student columns beyond the ``n`` selected classes: 1 for ``"paper"`` ("not selected" is
    the last of ``k = n + 1``), 0 for ``"consistent"`` (``k = n``; and for the closed set)."""
    return 1 if formulation == "paper" else 0


def _as_gamma(gamma, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(gamma, dtype=like.dtype, device=like.device)


def row_log_mass(scores: torch.Tensor, eps: float) -> torch.Tensor:
    """``l_i = logsumexp_j(Z_ij / eps)``: log of the row sums of ``K = exp(Z / eps)``.

    NaN for a row holding a NaN or ``+inf`` score, ``-inf`` for a row of ``-inf`` scores.
    """
    x = scores / eps
    l = torch.logsumexp(x, dim=-1)
    bad = torch.isnan(x).any(-1) | (x == math.inf).any(-1)
    return torch.where(bad, torch.full_like(l, math.nan), l)


def effective_gamma(l: torch.Tensor, gamma):
    """``(finite, gamma_eff)``: the rows that take part in the coupling and their total mass
    ``min(gamma, #finite rows)``; NaN when no row is finite or ``gamma <= 0``."""
    fin = torch.isfinite(l)
    n_fin = fin.sum().to(l.dtype)
    g = _as_gamma(gamma, l)
    ok = (g > 0) & (n_fin > 0)
    return fin, torch.where(ok, torch.minimum(g, n_fin), torch.full_like(g, math.nan))


def fallback_saturated(gamma_eff: torch.Tensor) -> torch.Tensor:
    """Saturated-row count when no candidate passes the exact test: ``max(ceil(gamma) - 1, 0)``.

    Only ``gamma`` equal to the number of finite rows can get here (rounding at the last
    candidate); then every row but the lightest is saturated, and the lightest takes the remaining
    mass 1, which is exact. The C++ and Triton kernels use this same formula.
    """
    return torch.clamp(torch.ceil(gamma_eff) - 1.0, min=0.0)


def exact_active_set(l: torch.Tensor, gamma):
    """``(k, sat, gamma_eff)`` of the exact projection: the saturated count ``k`` (a 0-d tensor in
    ``l``'s dtype), the (m,) saturated mask and the effective total mass.

    Sort the finite ``l`` descending; candidate ``c`` saturates the ``c`` largest rows and is
    accepted when ``gamma - c > 0`` and ``log(gamma - c) <= log sum_{j >= c} exp(l_(j) - l_(c))``
    (the largest unsaturated row is not pushed above mass 1). The sums are taken relative to the
    largest finite row, so they do not lose the small terms next to a huge ``l``. Ties are broken
    by index, as a stable sort does.
    """
    with torch.no_grad():
        m = l.shape[0]
        fin, g_eff = effective_gamma(l, gamma)
        n_fin = fin.sum()
        key = torch.where(fin, l, torch.full_like(l, -math.inf))
        order = torch.argsort(key, descending=True, stable=True)
        s = key[order]
        top = torch.where(torch.isfinite(s[0]), s[0], torch.zeros_like(s[0]))
        d = s - top
        tail = torch.logcumsumexp(d.flip(0), dim=0).flip(0) - d
        ks = torch.arange(m, device=l.device)
        rem = g_eff - ks.to(l.dtype)
        valid = (rem > 0) & (ks < n_fin) & \
            (torch.log(rem.clamp_min(torch.finfo(l.dtype).tiny)) <= tail)
        first = torch.argmax(valid.to(torch.int32)).to(l.dtype)
        k = torch.where(valid.any(), first, fallback_saturated(g_eff))
        rank = torch.empty_like(order).scatter_(0, order, ks)
        sat = fin & (rank.to(l.dtype) < k)
    return k, sat, g_eff


def _log_kappa_parts(l: torch.Tensor, sat: torch.Tensor, k: torch.Tensor, g_eff: torch.Tensor):
    # log kappa = log(gamma - k) - logsumexp(l over unsaturated finite rows), split as
    # (log(gamma - k) - lse_rel) - mu with mu the largest unsaturated row, so that
    # rho_i = (l_i - mu) + (...) is formed from differences of nearby numbers.
    unsat = torch.isfinite(l) & ~sat
    lu = torch.where(unsat, l, torch.full_like(l, -math.inf))
    mu = lu.max().detach()
    mu = torch.where(torch.isfinite(mu), mu, torch.zeros_like(mu))
    lse_rel = torch.logsumexp(lu - mu, dim=0)
    return mu, torch.log(g_eff - k) - lse_rel


def rho_exact(l: torch.Tensor, gamma):
    """Row log-masses of the exact KL projection, differentiable with the active set fixed.

    Returns ``(rho, sat, k)`` (``k`` a 0-d tensor).
    """
    k, sat, g_eff = exact_active_set(l.detach(), gamma)
    mu, rel = _log_kappa_parts(l, sat, k, g_eff)
    rho = torch.where(sat, torch.zeros_like(l), (l - mu) + rel)
    return rho, sat, k


def log_kappa_exact(l: torch.Tensor, gamma) -> torch.Tensor:
    """``log kappa`` of the exact projection for the row log-masses ``l`` (a 0-d tensor):
    unsaturated rows have ``rho_i = l_i + log kappa``. Used to score single samples against a
    reference batch (:func:`selkd_kernels.selkd_log_kappa`)."""
    k, sat, g_eff = exact_active_set(l.detach(), gamma)
    mu, rel = _log_kappa_parts(l.detach(), sat, k, g_eff)
    return rel - mu


def bregman_trajectory(l: torch.Tensor, gamma, n_iters: int) -> list:
    """Inputs of every round of paper 2's Alg. 1 and its result: ``[rho_0 = l, ..., rho_T]``.

    The one place the rounds are written: :func:`rho_bregman` takes the last entry, the backward
    (:func:`rho_vjp_bregman`) walks back through the others.
    """
    fin, g_eff = effective_gamma(l, gamma)
    log_g = torch.log(g_eff)
    traj = [l]
    r = l
    for _ in range(n_iters):
        a = torch.clamp(r, max=0.0)
        lse = torch.logsumexp(torch.where(fin, a, torch.full_like(a, -math.inf)), dim=0)
        r = torch.where(fin, a + (log_g - lse), l)
        traj.append(r)
    return traj


def rho_bregman(l: torch.Tensor, gamma, n_iters: int) -> torch.Tensor:
    """Row log-masses after ``n_iters`` rounds of paper 2's Alg. 1 (row clip, then rescale)."""
    return bregman_trajectory(l, gamma, n_iters)[-1]


def _nan_if_unsolvable(rho: torch.Tensor, l: torch.Tensor, gamma) -> torch.Tensor:
    _, g_eff = effective_gamma(l.detach(), gamma)
    return torch.where(torch.isnan(g_eff), torch.full_like(rho, math.nan), rho)


def coupling_parts(scores: torch.Tensor, gamma, eps: float, method: str = "exact",
                   n_iters: int = 10):
    """``(log P, l, rho, sat)`` for one batch: :func:`log_coupling` and the row log-masses ``l``
    (:func:`row_log_mass`) it was solved from, the backends' ``coupling`` outputs."""
    l = row_log_mass(scores, eps)
    if method == "exact":
        rho, sat, _ = rho_exact(l, gamma)
    elif method == "bregman":
        rho, sat = rho_bregman(l, gamma, n_iters), None
    else:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    rho = _nan_if_unsolvable(rho, l, gamma)
    return log_p_from(scores, eps, l, rho), l, rho, sat


def log_coupling(scores: torch.Tensor, gamma, eps: float, method: str = "exact",
                 n_iters: int = 10):
    """``(log P, rho, sat)`` for one batch; ``sat`` is the saturated mask (exact) or None."""
    log_p, _, rho, sat = coupling_parts(scores, gamma, eps, method, n_iters)
    return log_p, rho, sat


def log_p_from(scores: torch.Tensor, eps: float, l: torch.Tensor, rho: torch.Tensor):
    """``log P_ij = log_softmax_j(Z_i / eps) + rho_i``; ``-inf`` throughout a row of ``-inf``
    scores. The log-softmax is formed as ``(x - max) - log sum exp(x - max)``, not as
    ``x - l``: the latter rounds at the scale of ``|Z / eps|`` and would let a saturated row's
    mass drift above 1 by ``~1e-16 |Z / eps|``."""
    rel = torch.log_softmax(scores / eps, dim=-1)
    rel = torch.where((l == -math.inf).unsqueeze(-1), torch.full_like(rel, -math.inf), rel)
    return rel + rho.unsqueeze(-1)


def log_not_selected(rho: torch.Tensor) -> torch.Tensor:
    """``log(max(1 - exp(rho), NOT_SELECTED_FLOOR))``: the log "not selected" probability of a row
    with log mass ``rho`` (consistent formulation). Rows above mass 1 (Alg. 1) count as 1."""
    return torch.log(torch.clamp(-torch.expm1(rho), min=NOT_SELECTED_FLOOR))


def d_log_not_selected(rho: torch.Tensor) -> torch.Tensor:
    """Derivative of :func:`log_not_selected`: ``-1 / expm1(-rho)``, 0 where the floor holds."""
    free = -torch.expm1(rho) > NOT_SELECTED_FLOOR
    safe = torch.where(free, rho, torch.full_like(rho, -1.0))
    return torch.where(free, -1.0 / torch.expm1(-safe), torch.zeros_like(rho))


def label_weights(target: torch.Tensor, k: int, formulation: str, dtype):
    """``(Y, y_not_selected)``: (m, k) one-hot of the class labels and, for the consistent
    formulation, the (m,) indicator of label ``k`` ("not selected"); label ``-1`` gives neither."""
    y = target.long()
    cols = torch.arange(k, device=target.device)
    onehot = (y.unsqueeze(1) == cols.unsqueeze(0)).to(dtype)
    ns = (y == k).to(dtype) if formulation == "consistent" else None
    return onehot, ns


def open_set_loss(student_scores: torch.Tensor, teacher_scores: torch.Tensor,
                  target: torch.Tensor, gamma, eps: float, lam: float,
                  method: str = "exact", n_iters: int = 10,
                  formulation: str = "paper") -> torch.Tensor:
    """Scalar open-set SelKD loss (module docs); differentiable w.r.t. ``student_scores`` only.

    ``target`` holds local labels: ``[0, k)`` (paper: ``k - 1`` = "not selected"), ``[0, k]``
    (consistent: ``k`` = "not selected"), or ``-1`` for a row without a label.
    """
    log_ps, rho_s, _ = log_coupling(student_scores, gamma, eps, method, n_iters)
    with torch.no_grad():
        log_pt, rho_t, _ = log_coupling(teacher_scores.detach(), gamma, eps, method, n_iters)
        p_t = torch.exp(log_pt)
    rows, _, _ = loss_rows(log_ps, rho_s, p_t, rho_t, target, lam, formulation)
    return rows.sum() / student_scores.shape[0]


def loss_rows(log_ps, rho_s, p_t, rho_t, target, lam, formulation):
    """``(rows, W, w0)``: each row's open-set loss (module docs, before the ``1/m``), the weights
    ``W = Y + lam P_T`` of ``log P_S`` and, for the consistent formulation, the weights
    ``w0 = Y_n + lam (1 - sum_j P_T,ij)`` of ``log(1 - sum_j P_S,ij)`` (None for ``"paper"``).
    The one place :func:`open_set_loss` and :func:`loss_and_grad` form the loss."""
    Y, y_ns = label_weights(target, log_ps.shape[1], formulation, log_ps.dtype)
    W = Y + lam * p_t
    # 0 * log(0) from an underflowed teacher entry contributes nothing
    rows = -torch.where(W != 0, W * log_ps, torch.zeros_like(log_ps)).sum(1)
    w0 = None
    if formulation == "consistent":
        w0 = y_ns + lam * torch.clamp(-torch.expm1(rho_t), min=0.0)
        rows = rows - w0 * log_not_selected(rho_s)
    return rows, W, w0


# ---- closed-form derivatives (what every backend's backward computes) --------------------------

def rho_vjp_exact(rho, sat, gamma_eff, g):
    """``(d rho / d l)^T g`` for the exact projection with the active set ``sat`` fixed.

    Only finite unsaturated rows depend on ``l``: ``rho_i = l_i + log(gamma - k) -
    logsumexp_{unsat} l``.
    """
    unsat = torch.isfinite(rho) & ~sat
    k = sat.sum().to(rho.dtype)
    mass = torch.exp(torch.where(unsat, rho, torch.zeros_like(rho)))
    g_u = torch.where(unsat, g, torch.zeros_like(g)).sum()
    return torch.where(unsat, g - g_u * mass / (gamma_eff - k), torch.zeros_like(g))


def rho_vjp_bregman(trajectory: list, g):
    """``(d rho / d l)^T g`` for Alg. 1, walking back through the stored round inputs."""
    fin = torch.isfinite(trajectory[0])
    for r in reversed(trajectory[:-1]):
        a = torch.clamp(r, max=0.0)
        q = torch.softmax(torch.where(fin, a, torch.full_like(a, -math.inf)), dim=0)
        q = torch.where(fin, q, torch.zeros_like(q))
        g_fin = torch.where(fin, g, torch.zeros_like(g))
        g = torch.where(fin & (r <= 0), g_fin - q * g_fin.sum(), torch.zeros_like(g))
    return g


def grad_scores(eps, log_p, l, rho, sat, gamma, method, n_iters, grad_log_p, grad_rho=None):
    """Gradient w.r.t. the scores of a function ``F(log P, rho)``, given ``G = dF/dlog P`` and
    (optionally) the direct ``h = dF/drho``.

    ``log P_ij = Z_ij/eps - l_i + rho_i(l)`` gives
    ``dF/dZ = (G + softmax(Z/eps) * (J^T (g + h) - g)) / eps`` with ``g_i = sum_j G_ij`` and ``J``
    the Jacobian of ``rho`` w.r.t. ``l``.
    """
    g = grad_log_p.sum(-1)
    g_tot = g if grad_rho is None else g + grad_rho
    if method == "exact":
        _, g_eff = effective_gamma(l, gamma)
        jt_g = rho_vjp_exact(rho, sat, g_eff, g_tot)
    else:
        jt_g = rho_vjp_bregman(bregman_trajectory(l, gamma, n_iters), g_tot)
    # a row of -inf scores has no mass and no gradient (its log P - rho is -inf - -inf)
    empty = (rho == -math.inf).unsqueeze(-1)
    soft = torch.where(empty, torch.zeros_like(log_p), torch.exp(log_p - rho.unsqueeze(-1)))
    return (grad_log_p + soft * (jt_g - g).unsqueeze(-1)) / eps


def loss_and_grad(student_scores, teacher_scores, target, gamma, eps, lam, method="exact",
                  n_iters=10, formulation="paper"):
    """``(loss, dloss/dstudent_scores)`` of :func:`open_set_loss` in closed form, without
    autograd (the torch backend's fused forward; the compiled kernels compute the same)."""
    zs, zt = student_scores.detach(), teacher_scores.detach()
    m = zs.shape[0]
    log_ps, ls, rho_s, sat_s = coupling_parts(zs, gamma, eps, method, n_iters)
    log_pt, rho_t, _ = log_coupling(zt, gamma, eps, method, n_iters)
    p_t = torch.exp(log_pt)
    rows, W, w0 = loss_rows(log_ps, rho_s, p_t, rho_t, target, lam, formulation)
    grad_rho = None if w0 is None else -(w0 / m) * d_log_not_selected(rho_s)
    grad = grad_scores(eps, log_ps, ls, rho_s, sat_s, gamma, method, n_iters, -W / m, grad_rho)
    return rows.sum() / m, grad
