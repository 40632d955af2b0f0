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

Stopping early: once every row is frozen the loop ends (one device read per check), which changes
no value and no iteration count; traced code (``torch.compile``) cannot branch on the device and
runs all ``n_iters``.

Zero entries: ``a_i = 0`` gives ``alpha_i = -inf`` (``u_i = 0``) and contributes nothing to the loss;
likewise for ``b``. A row whose ``a`` and ``b`` are both entirely zero has exactly one feasible
plan, ``T = 0``: its loss and error are 0 and its potentials ``-inf`` (docs/guarantees.md). A NaN or
inf in ``a``, ``b`` or the cost makes the affected rows' loss, error and potentials NaN.

Memory: the log-domain updates stream over the batch and the class axes in blocks of at most
``chunk_elems`` entries (:data:`CHUNK_ELEMS`), so beyond the inputs they hold
``O(B (m + n) + chunk_elems)`` numbers instead of a (B, m, n) array; the gradient w.r.t. a shared
cost, ``sum_b w_b T_b``, is one (m, B) x (B, n) matrix product where that is exact to rounding
(:func:`plan_weighted_sum`), chunked exponentials otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# Largest (max M - min M) / eps for which the standard-domain iteration is used by method="auto".
# exp(-R) must stay far above the dtype's smallest normal even after multiplication by scalings
# that themselves range over exp(+-R): float32 normals end near exp(-87), float64 near exp(-708).
STANDARD_DOMAIN_MAX_RANGE = {torch.float32: 25.0, torch.float64: 200.0}

# Entries per temporary block of the log-domain updates (1 MiB in float32): a block and
# logsumexp's temporaries stay in a core's L2 cache, which made the blocked update 1.5-3x faster
# than one (64, 1000, 1000) call on this project's CPU machine, and B = 4096, 1000 x 1000
# (4e9 entries) needs no more than a few blocks of memory.
CHUNK_ELEMS = 1 << 18

# Entries per block of the plan-based gradients' fallback (16 MiB in float32). Each block is only
# four elementwise passes and one small product, so with 2 threads the per-operation start-up
# dominated smaller blocks: B = 128, 1000 x 1000 took 2.6 s CPU in 2^18-entry blocks, 0.6 s in
# 2^22 (0.44 vs 0.38 s with one thread); the earlier einsum over 2^24-entry blocks took 4.4 s CPU
# at B = 256 where these take 1.1 s.
PLAN_CHUNK_ELEMS = 1 << 22

# eps-scaling never runs more intermediate stages than this; a factor that would need more is
# replaced by the geometric factor that reaches eps in exactly this many stages.
MAX_SCALING_STAGES = 100


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

    Reads the cost's range, so it synchronises with the device once per call. Traced code
    (``torch.compile``) cannot read it and takes ``"log"``, which is safe for every cost and
    produces the same iterates up to rounding.
    """
    if torch.compiler.is_compiling():
        return "log"
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


# ---- log-domain updates, streamed over blocks of rows and classes ------------------------------

def _lse_block(x, Ms, dim):
    if dim == -1:  # LSE_j(x_bj - Ms_bij): (B, m)
        return torch.logsumexp(x.unsqueeze(-2) - Ms, dim=-1)
    return torch.logsumexp(x.unsqueeze(-1) - Ms, dim=-2)  # LSE_i(x_bi - Ms_bij): (B, n)


def _block_sizes(B, free, red, chunk):
    """Rows and free classes per block so that rows * free * red <= chunk (at least 1 x 1)."""
    fs = min(free, max(1, chunk // max(1, red)))
    bs = min(B, max(1, chunk // max(1, fs * red)))
    return bs, fs


def lse_update(x, Ms, dim, *, eps=None, chunk_elems=CHUNK_ELEMS):
    """Log-sum-exp over one class axis of ``x - Ms``, never forming more than ``chunk_elems``
    entries at once.

    ``dim=-1``: ``out_bi = LSE_j(x_bj - Ms_bij)`` for ``x`` (B, n), result (B, m).
    ``dim=-2``: ``out_bj = LSE_i(x_bi - Ms_bij)`` for ``x`` (B, m), result (B, n).
    ``Ms`` is (1, m, n) (shared) or (B, m, n). With ``eps`` given, ``Ms`` is the unscaled cost and
    each block is divided by ``eps`` as it is formed (no scaled (B, m, n) copy of a per-row cost).
    Each output entry is the same reduction over the same numbers as in one unblocked call.
    """
    B = x.shape[0]
    m, n = Ms.shape[-2:]
    red, free = (n, m) if dim == -1 else (m, n)
    bs, fs = _block_sizes(B, free, red, chunk_elems)

    def block(xs, Mb):
        return _lse_block(xs, Mb if eps is None else Mb / eps, dim)

    if bs >= B and fs >= free:
        return block(x, Ms)
    out = x.new_empty((B, free))
    for b0 in range(0, B, bs):
        xs = x[b0:b0 + bs]
        Mb = Ms if Ms.shape[0] == 1 else Ms[b0:b0 + bs]
        for c0 in range(0, free, fs):
            Mc = Mb[:, c0:c0 + fs, :] if dim == -1 else Mb[:, :, c0:c0 + fs]
            out[b0:b0 + bs, c0:c0 + fs] = block(xs, Mc)
    return out


def _iterate(step, state, marginal_err, n_iters, tol, check_every, B, device):
    """Run ``step`` n_iters times with per-row freezing on ``tol`` (checked every check_every
    iterations and after the last); stop once every row is frozen. Returns final state and
    per-row iteration counts."""
    iters = torch.zeros(B, dtype=torch.int32, device=device)
    active = torch.ones(B, dtype=torch.bool, device=device)
    # the early exit reads one flag from the device per check; a traced graph cannot branch on
    # it, and running on changes nothing (frozen rows keep their values and counts)
    may_exit = not torch.compiler.is_compiling()
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
            if may_exit and t < n_iters and not bool(active.any()):
                break
    return state, iters


def solve_log(a, b, cost, *, eps, n_iters, tol=None, check_every=10, init=None,
              chunk_elems=CHUNK_ELEMS):
    """Log-domain Sinkhorn (the log-domain update of docs/ops/sinkhorn.md). Autograd-friendly (no
    in-place on graph tensors); memory beyond the inputs ``O(B (m + n) + chunk_elems)``.

    ``init``: optional starting potentials ``(alpha, beta)`` (warm start, used by eps-scaling)."""
    B, m = a.shape
    shared = cost.dim() == 2
    # a shared cost is scaled once (m x n); a per-row cost block by block, never as a whole copy
    Ms, div = (cost.unsqueeze(0) / eps, None) if shared else (cost, eps)
    log_a, log_b = torch.log(a), torch.log(b)

    def lse(x, dim):
        return lse_update(x, Ms, dim, eps=div, chunk_elems=chunk_elems)

    def step(state):
        _, g = state
        # a zero mass keeps its -inf potential even where the LSE is -inf too (a row without
        # any mass), instead of forming -inf - (-inf) = NaN
        f = torch.where(a > 0, log_a - lse(g, -1), log_a)
        g = torch.where(b > 0, log_b - lse(f, -2), log_b)
        return f, g

    def row_marginal(f, g):
        return torch.exp(f + lse(g, -1))

    def marginal_err(state):
        return (row_marginal(*state) - a).abs().sum(-1)

    if init is None:
        start = (torch.zeros_like(a), torch.zeros_like(b))
    else:
        start = (init[0] / eps, init[1] / eps)
    (f, g), iters = _iterate(step, start, marginal_err, n_iters, tol, check_every, B, a.device)
    r = row_marginal(f, g)
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
    # loss term alpha_i r_i would then be -inf * 0 = NaN for finite inputs. A zero mass gives a
    # zero scaling even where its denominator is 0 too (a row without any mass): not 0/0 = NaN.
    def step(state):
        _, v, _, _ = state
        s = Kv(v)
        u = torch.where(a > 0, a / s, a)
        c = KTu(u)
        return u, torch.where(b > 0, b / c, b), s, c

    def marginal_err(state):
        u, v, _, _ = state
        return (u * Kv(v) - a).abs().sum(-1)

    (u, v, s, c), iters = _iterate(step, (torch.ones_like(a), torch.ones_like(b),
                                          torch.ones_like(a), torch.ones_like(b)),
                                   marginal_err, n_iters, tol, check_every, B, a.device)
    r = u * Kv(v)
    log_a, log_b = torch.log(a), torch.log(b)
    alpha = torch.where(a > 0, eps * (log_a - torch.log(s)) + (shift if shared else shift[:, None]),
                        log_a)
    beta = torch.where(b > 0, eps * (log_b - torch.log(c)), log_b)
    err = (r - a).abs().sum(-1)
    loss = primal_loss(alpha, beta, r, a, b, eps)
    return SolveOutput(loss, alpha, beta, iters, err)


# ---- eps-scaling -------------------------------------------------------------------------------

def finite_range(cost) -> float:
    """``max M - min M`` over the finite entries of the cost (0 when there are none)."""
    fin = torch.isfinite(cost)
    hi = torch.where(fin, cost, torch.full_like(cost, -math.inf)).amax()
    lo = torch.where(fin, cost, torch.full_like(cost, math.inf)).amin()
    top = float((hi.double() - lo.double()).item())
    return top if math.isfinite(top) else 0.0


def eps_schedule(cost, eps, factor):
    """Decreasing regularisations ``eps_0 > eps_1 > ... > eps`` for eps-scaling: start at the
    range of the cost's finite entries (where the plan is nearly the product of marginals and one
    iteration suffices) and multiply by ``factor`` until ``eps`` is reached. The last entry is
    ``eps`` itself.

    The number of intermediate stages is ``k = ceil(log(range / eps) / log(1 / factor))``, computed
    up front, so no cost makes the schedule grow without bound: NaN and inf entries (their rows
    are NaN anyway) do not count towards the range, and ``k`` is capped at
    :data:`MAX_SCALING_STAGES` by spacing that many stages geometrically from the range to ``eps``.
    """
    top = finite_range(cost)
    if not top > eps:
        return [eps]
    k = math.ceil(math.log(top / eps) / math.log(1.0 / factor))
    if k > MAX_SCALING_STAGES:
        k, factor = MAX_SCALING_STAGES, (eps / top) ** (1.0 / MAX_SCALING_STAGES)
    stages = [top * factor ** i for i in range(k)]
    return [e for e in stages if e > eps] + [eps]


def solve(a, b, cost, *, eps, n_iters, tol=None, check_every=10, method="auto",
          eps_scaling=None, scaling_iters=10, chunk_elems=CHUNK_ELEMS):
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
                                  scaling_iters=scaling_iters, chunk_elems=chunk_elems)
    if method == "auto":
        method = choose_method(cost, eps, a.dtype)
    if method == "standard":
        out = solve_standard(a, b, cost, eps=eps, n_iters=n_iters, tol=tol,
                             check_every=check_every)
    else:
        out = solve_log(a, b, cost, eps=eps, n_iters=n_iters, tol=tol, check_every=check_every,
                        chunk_elems=chunk_elems)
    return _poison_bad_rows(out, a, b, cost, n_iters)


def _solve_eps_scaling(a, b, cost, *, eps, n_iters, tol, check_every, factor, scaling_iters,
                       chunk_elems):
    stages = eps_schedule(cost, eps, factor)
    init, extra = None, 0
    for e in stages[:-1]:
        out = solve_log(a, b, cost, eps=e, n_iters=scaling_iters, init=init,
                        chunk_elems=chunk_elems)
        init, extra = (out.alpha, out.beta), extra + scaling_iters
    out = solve_log(a, b, cost, eps=eps, n_iters=n_iters, tol=tol, check_every=check_every,
                    init=init, chunk_elems=chunk_elems)
    out.iters = out.iters + extra
    return _poison_bad_rows(out, a, b, cost, n_iters + extra)


def _poison_bad_rows(out, a, b, cost, total_iters):
    """Rows with a NaN or inf input: NaN loss, error and potentials, all iterations counted
    (whatever the arithmetic produced; the compiled backends report the same)."""
    bad = _bad_rows(a, b, cost)
    nan = float("nan")
    out.loss = torch.where(bad, torch.full_like(out.loss, nan), out.loss)
    out.err = torch.where(bad, torch.full_like(out.err, nan), out.err)
    out.alpha = torch.where(bad.unsqueeze(-1), torch.full_like(out.alpha, nan), out.alpha)
    out.beta = torch.where(bad.unsqueeze(-1), torch.full_like(out.beta, nan), out.beta)
    out.iters = torch.where(bad, torch.full_like(out.iters, total_iters), out.iters)
    return out


# ---- plans and the gradients built from them ---------------------------------------------------

def transport_plan(alpha, beta, cost, eps):
    """The plan ``T_bij = exp((alpha_bi + beta_bj - M_ij)/eps)``, shape (B, m, n)."""
    return torch.exp((alpha.unsqueeze(-1) + beta.unsqueeze(-2) - _as_batched(cost)) / eps)


def plan_weighted_sum(alpha, beta, cost, eps, weights, chunk_elems=PLAN_CHUNK_ELEMS,
                      allow_gemm=True):
    """``sum_b weights_b T_b`` (m, n) for a shared cost: the gradient of ``sum_b weights_b S_b``
    w.r.t. the cost (dS/dM = T, docs/ops/sinkhorn.md), without forming the (B, m, n) plans.

    With per-row shifts ``c_b = max_i alpha_bi``, ``d_b = max_j beta_bj`` and ``M_0 = min M``::

        sum_b w_b T_bij = exp(X) K_ij (U^T diag(w') V)_ij,   K_ij = exp(-(M_ij - M_0)/eps),
        U_bi = exp((alpha_bi - c_b)/eps),  V_bj = exp((beta_bj - d_b)/eps),
        x_b = (c_b + d_b - M_0)/eps,  X = max_b x_b,  w'_b = w_b exp(x_b - X),

    one (m, B) x (B, n) matrix product and ``B (m + n) + m n`` exponentials instead of ``B m n``.
    Every factor lies in [0, 1] and ``exp(X)`` is finite when ``(max M - min M)/eps`` and ``|X|``
    are within :data:`STANDARD_DOMAIN_MAX_RANGE` (the standard domain's rule); what underflows
    then is below ``tiny * exp(X)`` in absolute terms. Otherwise, or while traced (the test reads
    the device), the plans are exponentiated in blocks of at most ``chunk_elems`` entries.
    """
    w = weights.to(alpha.dtype)
    if allow_gemm and not torch.compiler.is_compiling():
        out = _plan_weighted_sum_gemm(alpha, beta, cost, eps, w)
        if out is not None:
            return out
    out = torch.zeros(cost.shape, dtype=alpha.dtype, device=alpha.device)
    for rows, cls, T in _plan_blocks(alpha, beta, cost.unsqueeze(0), eps, chunk_elems):
        # sum over the block's rows as one (1, bs) x (bs, fs n) product
        out[cls] += (w[rows].unsqueeze(0) @ T.flatten(1)).view_as(out[cls])
    return out


def _plan_blocks(alpha, beta, cost, eps, chunk_elems):
    """Yield ``(rows, classes, T)``: the plan entries ``T[rows, classes, :]`` in blocks of at most
    ``chunk_elems`` entries (at least one plan row of n entries), each formed in place in one buffer.
    ``cost`` is (1, m, n) or (B, m, n)."""
    B, m = alpha.shape
    n = beta.shape[1]
    bs, fs = _block_sizes(B, m, n, chunk_elems)
    for b0 in range(0, B, bs):
        rows = slice(b0, b0 + bs)
        Mb = cost if cost.shape[0] == 1 else cost[rows]
        for i0 in range(0, m, fs):
            cls = slice(i0, i0 + fs)
            T = alpha[rows, cls].unsqueeze(-1) + beta[rows].unsqueeze(-2)
            yield rows, cls, T.sub_(Mb[:, cls]).div_(eps).exp_()


def _row_shift(p):
    c = p.amax(-1)
    return torch.where(torch.isfinite(c), c, torch.zeros_like(c))  # all -inf or NaN rows: 0


def _plan_weighted_sum_gemm(alpha, beta, cost, eps, w):
    limit = STANDARD_DOMAIN_MAX_RANGE.get(alpha.dtype, 25.0)
    m0 = cost.amin()
    c, d = _row_shift(alpha), _row_shift(beta)
    x = (c + d - m0) / eps
    big = x.amax()
    span, top = torch.stack([(cost.amax() - m0) / eps, big]).tolist()
    if not (span <= limit and abs(top) <= limit):  # NaN fails too
        return None
    U = torch.exp((alpha - c.unsqueeze(-1)) / eps)
    V = torch.exp((beta - d.unsqueeze(-1)) / eps)
    K = torch.exp(-(cost - m0) / eps)
    P = (U * (w * torch.exp(x - big)).unsqueeze(-1)).T @ V
    return K * P * torch.exp(big)


def plan_times_weights(alpha, beta, cost, eps, weights, chunk_elems=PLAN_CHUNK_ELEMS):
    """``weights_b T_b`` (B, m, n) for a per-row cost (the gradient of ``sum_b weights_b S_b``
    w.r.t. it), written block by block: no temporary beyond ``chunk_elems`` entries."""
    w = weights.to(alpha.dtype)
    out = torch.empty(cost.shape, dtype=alpha.dtype, device=alpha.device)
    for rows, cls, T in _plan_blocks(alpha, beta, cost, eps, chunk_elems):
        out[rows, cls] = T.mul_(w[rows, None, None])
    return out


def cost_gradient(alpha, beta, cost, eps, weights):
    """``d(sum_b weights_b S_b)/dM``: the weighted sum of the plans for a shared cost, each row's
    weighted plan for a per-row cost (envelope theorem, dS/dM = T)."""
    if cost.dim() == 2:
        return plan_weighted_sum(alpha, beta, cost, eps, weights)
    return plan_times_weights(alpha, beta, cost, eps, weights)


def unrolled_gradients(rows_of, inputs, need, grad_rows):
    """Gradients of ``sum_b grad_rows_b rows_b`` w.r.t. the ``inputs`` flagged in ``need``,
    through the reference iterations (``rows_of(*inputs).loss``), with a graph for the next
    derivative: what a backward under ``create_graph=True`` returns (None where not needed)."""
    wanted = [x for x, nd in zip(inputs, need) if nd]
    rows = rows_of(*inputs).loss
    got = iter(torch.autograd.grad(rows, wanted, grad_rows.to(rows.dtype), create_graph=True,
                                   allow_unused=True))
    out = []
    for x, nd in zip(inputs, need):
        g = next(got) if nd else None
        out.append(None if g is None else g.to(x.dtype))
    return out


def marginal_gradient(potential, mass):
    """The envelope gradient of S w.r.t. a marginal: the potential itself (dS/da = alpha,
    dS/db = beta), 0 where the mass is 0 (docs/guarantees.md explains the choice)."""
    return torch.where(mass > 0, potential, torch.zeros_like(potential))


def softmax_envelope_grad(potential, p, tau):
    """``(phi - <phi, p>) * p / tau``: the chain rule of dS/dp = phi through p = softmax(z/tau)
    (paper 1, Prop. 4.2, Eq. 15). Entries with p == 0 (potential -inf) contribute and receive 0,
    also in a NaN row; the other entries of a NaN row are NaN (as in the compiled backends)."""
    zero = p == 0
    phi = torch.where(zero, torch.zeros_like(potential), potential)
    grad = (phi - (phi * p).sum(-1, keepdim=True)) * p / tau
    return torch.where(zero, torch.zeros_like(grad), grad)


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
