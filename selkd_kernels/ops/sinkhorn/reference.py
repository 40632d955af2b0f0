r"""Pure-PyTorch reference for batched entropic OT (docs/ops/sinkhorn.md). It defines the right answer for
every compiled backend.

Problem (paper 1, Eq. 5 and 12), per row of the batch::

    S_eps(a, b) = min_{T >= 0, T 1 = a, T^T 1 = b}  <T, M> - eps * H(T),
    H(T) = -sum_ij T_ij (log T_ij - 1).

Its dual (Eq. 13) is ``max <alpha, a> + <beta, b> - eps sum_ij exp((alpha_i + beta_j - M_ij)/eps)``
and the optimal plan is ``T = diag(u) K diag(v)``, ``K = exp(-M/eps)``, ``alpha = eps log u``,
``beta = eps log v`` (Eq. 18-19).

Updates (Alg. 3 / Eq. 20), starting from ``u = v = 1`` (``alpha = beta = 0``), one iteration is an
alpha-update followed by a beta-update:

* standard domain: ``u <- a / (K v)``, ``v <- b / (K^T u)``;
* log domain: ``alpha_i <- eps log a_i - eps LSE_j((beta_j - M_ij)/eps)`` and
  ``beta_j <- eps log b_j - eps LSE_i((alpha_i - M_ij)/eps)``.

Both produce the same iterates; the log domain never under- or overflows, the standard domain is
two matrix products per iteration and is what ``method="auto"`` uses when ``(max M - min M)/eps``
is small enough for the working precision (see :func:`choose_method`).

Reported loss: the primal value of the plan after the last beta-update, whose column sums are exactly
``b`` and whose row sums ``r = u * (K v)`` approach ``a``::

    <T, M> - eps H(T) = <alpha, r> + <beta, b> - eps * sum(r)

(substitute ``log T_ij = (alpha_i + beta_j - M_ij)/eps``), so ``T`` is never materialised.
Stopping: with ``tol`` set, the row-marginal error ``||r - a||_1`` is checked every
``check_every`` iterations and after the last one, per row; rows at or below ``tol`` freeze.

Zero entries: ``a_i = 0`` gives ``alpha_i = -inf`` (``u_i = 0``) and contributes nothing to the loss;
likewise for ``b``. A NaN or inf in ``a``, ``b`` or the cost makes the affected rows' loss NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Largest (max M - min M) / eps for which the standard-domain iteration is used by method="auto".
# exp(-R) must stay far above the dtype's smallest normal even after multiplication by scalings
# that themselves range over exp(+-R): float32 normals end near exp(-87), float64 near exp(-708).
STANDARD_DOMAIN_MAX_RANGE = {torch.float32: 25.0, torch.float64: 200.0}


@dataclass
class SolveOutput:
    """What every backend's solve returns (compute dtype: float32, or float64 for float64 input)."""
    loss: torch.Tensor    # (B,)
    alpha: torch.Tensor   # (B, m)  -inf where a == 0
    beta: torch.Tensor    # (B, n)  -inf where b == 0
    iters: torch.Tensor   # (B,) int32, iterations performed by each row
    err: torch.Tensor     # (B,) ||r - a||_1 of the returned potentials


@dataclass
class KDForward:
    """What every backend's fused KD forward returns: per-row loss and the envelope gradients."""
    loss: torch.Tensor                    # (B,)
    grad_student: torch.Tensor            # (B, n)  dS/dz_S
    grad_teacher: Optional[torch.Tensor]  # (B, m)  dS/dz_T, None unless asked for
    alpha: torch.Tensor
    beta: torch.Tensor
    iters: torch.Tensor
    err: torch.Tensor


def choose_method(cost: torch.Tensor, eps: float, dtype: torch.dtype) -> str:
    """``"standard"`` when exp(-(M - min M)/eps) is safe in ``dtype``, else ``"log"``.

    Reads the cost's range, so it synchronises with the device once per call.
    """
    rng = float((cost.amax() - cost.amin()).item()) / eps
    if not (rng == rng):  # NaN cost: either path propagates it
        return "log"
    return "standard" if rng <= STANDARD_DOMAIN_MAX_RANGE.get(dtype, 25.0) else "log"


def _bad_rows(a, b, cost):
    """Rows whose inputs hold NaN or inf; their loss is forced to NaN."""
    bad = ~(torch.isfinite(a).all(-1) & torch.isfinite(b).all(-1))
    if cost.dim() == 2:
        bad = bad | ~torch.isfinite(cost).all()
    else:
        bad = bad | ~torch.isfinite(cost).flatten(1).all(-1)
    return bad


def _as_batched(cost):
    return cost.unsqueeze(0) if cost.dim() == 2 else cost


def primal_loss(alpha, beta, r, a, b, eps):
    """``<alpha, r> + <beta, b> - eps * sum(r)`` with zero-mass entries contributing nothing."""
    ar = torch.where(a > 0, alpha * r, torch.zeros_like(r))
    bb = torch.where(b > 0, beta * b, torch.zeros_like(b))
    return ar.sum(-1) + bb.sum(-1) - eps * r.sum(-1)


def _log_row_marginal(f, g, Ms):
    """log r_i = f_i + LSE_j(g_j - Ms_ij), potentials in units of eps."""
    return f + torch.logsumexp(g.unsqueeze(-2) - Ms, dim=-1)


def _iterate(step, state, marginal_err, n_iters, tol, check_every, B, device):
    """Run ``step`` n_iters times with per-row freezing on ``tol`` (checked every check_every
    iterations and after the last). Returns final state and per-row iteration counts."""
    iters = torch.zeros(B, dtype=torch.int32, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    for t in range(1, n_iters + 1):
        new = step(state)
        if tol is None:
            state = new
            iters += 1
            continue
        mask = active.unsqueeze(-1)
        state = tuple(torch.where(mask, x_new, x) for x_new, x in zip(new, state))
        iters = iters + active.to(torch.int32)
        if t % check_every == 0 or t == n_iters:
            active = active & ~(marginal_err(state) <= tol)
    return state, iters


def solve_log(a, b, cost, *, eps, n_iters, tol=None, check_every=10, init=None):
    """Log-domain Sinkhorn (the log-domain update of docs/ops/sinkhorn.md). Autograd-friendly (no in-place).

    ``init``: optional starting potentials ``(alpha, beta)`` (warm start, used by eps-scaling)."""
    B, m = a.shape
    Ms = _as_batched(cost) / eps
    log_a, log_b = torch.log(a), torch.log(b)

    def step(state):
        f, g = state
        f = log_a - torch.logsumexp(g.unsqueeze(-2) - Ms, dim=-1)
        g = log_b - torch.logsumexp(f.unsqueeze(-1) - Ms, dim=-2)
        return f, g

    def marginal_err(state):
        f, g = state
        return (torch.exp(_log_row_marginal(f, g, Ms)) - a).abs().sum(-1)

    if init is None:
        start = (torch.zeros_like(a), torch.zeros_like(b))
    else:
        start = (init[0] / eps, init[1] / eps)
    (f, g), iters = _iterate(step, start, marginal_err, n_iters, tol, check_every, B, a.device)
    r = torch.exp(_log_row_marginal(f, g, Ms))
    alpha, beta = eps * f, eps * g
    err = (r - a).abs().sum(-1)
    loss = primal_loss(alpha, beta, r, a, b, eps)
    return SolveOutput(loss, alpha, beta, iters, err)


def solve_standard(a, b, cost, *, eps, n_iters, tol=None, check_every=10):
    """Standard-domain Sinkhorn (Alg. 3): ``u <- a/(Kv)``, ``v <- b/(K^T u)``.

    The cost is shifted by its minimum (per problem) before exponentiation; the shift is given back
    to alpha, which leaves the plan and the loss unchanged.
    """
    B, m = a.shape
    shared = cost.dim() == 2
    shift = cost.amin() if shared else cost.amin(dim=(1, 2))
    K = torch.exp(-(_as_batched(cost) - (shift if shared else shift[:, None, None])) / eps)

    def Kv(v):
        return v @ K[0].T if shared else torch.einsum("bmn,bn->bm", K, v)

    def KTu(u):
        return u @ K[0] if shared else torch.einsum("bmn,bm->bn", K, u)

    # The state keeps each update's denominator (s = K v, c = K^T u) as well as the scalings: the
    # potentials are taken as eps (log a - log s), eps (log b - log c). eps log(a / s) would be -inf
    # where a tiny positive mass (a float32 subnormal) makes the quotient underflow to 0, and the
    # loss term alpha_i r_i would then be -inf * 0 = NaN for finite inputs.
    def step(state):
        _, v, _, _ = state
        s = Kv(v)
        u = a / s
        c = KTu(u)
        return u, b / c, s, c

    def marginal_err(state):
        u, v, _, _ = state
        return (u * Kv(v) - a).abs().sum(-1)

    (u, v, s, c), iters = _iterate(step, (torch.ones_like(a), torch.ones_like(b),
                                          torch.ones_like(a), torch.ones_like(b)),
                                   marginal_err, n_iters, tol, check_every, B, a.device)
    r = u * Kv(v)
    alpha = eps * (torch.log(a) - torch.log(s)) + (shift if shared else shift[:, None])
    beta = eps * (torch.log(b) - torch.log(c))
    err = (r - a).abs().sum(-1)
    loss = primal_loss(alpha, beta, r, a, b, eps)
    return SolveOutput(loss, alpha, beta, iters, err)


def eps_schedule(cost, eps, factor):
    """Decreasing regularisations ``eps_0 > eps_1 > ... > eps`` for eps-scaling: start at the
    cost's range (where the plan is nearly the product of marginals and one iteration suffices)
    and multiply by ``factor`` until ``eps`` is reached. The last entry is ``eps`` itself."""
    top = float((cost.amax() - cost.amin()).item())
    out = []
    e = top
    while e > eps and e == e:
        out.append(e)
        e *= factor
    return out + [eps]


def solve(a, b, cost, *, eps, n_iters, tol=None, check_every=10, method="auto",
          eps_scaling=None, scaling_iters=10):
    """Reference solve in the compute dtype of the inputs; NaN/inf inputs give NaN loss rows.

    ``eps_scaling`` (a factor in (0, 1), e.g. 0.5): anneal the regularisation from the cost's
    range down to ``eps`` (Schmitzer 2019, Sec. 3.2; the annealing GeomLoss uses), running
    ``scaling_iters`` log-domain iterations per intermediate eps and warm-starting each stage from
    the previous potentials; then ``n_iters``/``tol`` apply at ``eps``. Small eps (large
    ``max M / eps``) converges in far fewer total iterations this way. ``iters`` counts all stages.
    """
    if eps_scaling is not None:
        return _solve_eps_scaling(a, b, cost, eps=eps, n_iters=n_iters, tol=tol,
                                  check_every=check_every, factor=eps_scaling,
                                  scaling_iters=scaling_iters)
    if method == "auto":
        method = choose_method(cost, eps, a.dtype)
    fn = solve_standard if method == "standard" else solve_log
    out = fn(a, b, cost, eps=eps, n_iters=n_iters, tol=tol, check_every=check_every)
    return _poison_bad_rows(out, a, b, cost)


def _solve_eps_scaling(a, b, cost, *, eps, n_iters, tol, check_every, factor, scaling_iters):
    stages = eps_schedule(cost, eps, factor)
    init, extra = None, 0
    for e in stages[:-1]:
        out = solve_log(a, b, cost, eps=e, n_iters=scaling_iters, init=init)
        init, extra = (out.alpha, out.beta), extra + scaling_iters
    out = solve_log(a, b, cost, eps=eps, n_iters=n_iters, tol=tol, check_every=check_every,
                    init=init)
    out.iters = out.iters + extra
    return _poison_bad_rows(out, a, b, cost)


def _poison_bad_rows(out, a, b, cost):
    bad = _bad_rows(a, b, cost)
    out.loss = torch.where(bad, torch.full_like(out.loss, float("nan")), out.loss)
    out.err = torch.where(bad, torch.full_like(out.err, float("nan")), out.err)
    return out


def transport_plan(alpha, beta, cost, eps):
    """The plan ``T_bij = exp((alpha_bi + beta_bj - M_ij)/eps)``, shape (B, m, n)."""
    return torch.exp((alpha.unsqueeze(-1) + beta.unsqueeze(-2) - _as_batched(cost)) / eps)


def plan_weighted_sum(alpha, beta, cost, eps, weights, chunk_elems=1 << 24):
    """``sum_b weights_b T_b`` (m, n) for a shared cost, in chunks of rows so memory stays bounded:
    the gradient of ``sum_b weights_b S_b`` w.r.t. a shared cost (dS/dM = T, docs/ops/sinkhorn.md)."""
    B, m = alpha.shape
    n = beta.shape[1]
    step = max(1, chunk_elems // max(1, m * n))
    out = torch.zeros(m, n, dtype=alpha.dtype, device=alpha.device)
    for s in range(0, B, step):
        T = transport_plan(alpha[s:s + step], beta[s:s + step], cost, eps)
        out += torch.einsum("b,bmn->mn", weights[s:s + step].to(T.dtype), T)
    return out


def softmax_envelope_grad(potential, p, tau):
    """``(phi - <phi, p>) * p / tau``: the chain rule of dS/dp = phi through p = softmax(z/tau)
    (paper 1, Prop. 4.2, Eq. 15). Entries with p == 0 (potential -inf) contribute and receive 0."""
    phi = torch.where(p > 0, potential, torch.zeros_like(potential))
    return (phi - (phi * p).sum(-1, keepdim=True)) * p / tau


def kd_forward(student_logits, teacher_logits, cost, *, tau, eps, n_iters, tol=None,
               check_every=10, teacher_grad=False, method="auto"):
    """Reference fused KD forward: temperature softmaxes (Eq. 10), Sinkhorn distance (Eq. 12) with
    the teacher as source ``a`` and the student as target ``b``, and the envelope gradients (docs/ops/sinkhorn.md)."""
    cd = student_logits.dtype
    p_t = torch.softmax(teacher_logits.to(cd) / tau, dim=-1)
    p_s = torch.softmax(student_logits / tau, dim=-1)
    out = solve(p_t, p_s, cost.to(cd), eps=eps, n_iters=n_iters, tol=tol,
                check_every=check_every, method=method)
    g_s = softmax_envelope_grad(out.beta, p_s, tau)
    g_t = softmax_envelope_grad(out.alpha, p_t, tau) if teacher_grad else None
    return KDForward(out.loss, g_s, g_t, out.alpha, out.beta, out.iters, out.err)
