r"""Stabilised scaling Sinkhorn (Schmitzer's absorption) for one row at a time, the row's kernel
in registers: the Triton backend's kernel for small eps (the log domain of the reference), for
per-row costs and for ``method="log"``, up to ``pow2(m) * pow2(n) <= 128 * 128`` (docs/gpu.md).

Mathematics (paper 1, Eq. 18-20; Schmitzer 2019, "Stabilized sparse scaling algorithms for
entropy regularized transport problems", Alg. 2). Potentials are kept in base-2 units of eps,
``f = alpha log2(e) / eps``, ``g = beta log2(e) / eps``, with the scaled cost
``C = M log2(e) / eps``. The row's iterate is split into absorbed potentials ``(f, g)`` and
scalings ``(u, v)``: the plan is ``T = diag(u) Kt diag(v)`` with the row's kernel
``Kt_ij = exp2(f_i + g_j - C_ij)`` held in registers. An iteration is then the scaling step::

    s = Kt v,  u = a / s,   c = Kt^T u,  v = b / c

(one multiply-add per cost entry and half-iteration, no exponential), which is exactly the
log-domain iteration of the reference because ``f_i + log2 u_i = log2 a_i - LSE2_j(g_j +
log2 v_j - C_ij)``. Two things keep it exact in floating point:

* absorption: when some ``u`` or ``v`` leaves ``[2^-BOUND, 2^BOUND]`` the scalings are moved into
  the potentials (``f += log2 u``, ``g += log2 v``, ``u = v = 1``) and ``Kt`` is rebuilt, one
  ``exp2`` per entry. Between absorptions the plan's entries are ``u_i Kt_ij v_j`` with the
  scalings bounded, so an entry of ``Kt`` lost to underflow stands for a negligible mass;
* the log-domain fallback: the first iteration, and any iteration whose denominators ``s`` or
  ``c`` (at entries of positive mass) fall below a floor where the underflowed entries of ``Kt``
  would matter or are not finite, is computed in the log domain instead (two log-sum-exps over
  the row, from which ``Kt`` is rebuilt without a third pass). A small eps at the start of a solve
  takes this path a few times, a converging solve almost never.

The potentials are reported as the reference's log domain gives them: ``alpha = eps ln2 (f +
log2 a - log2 s)`` with ``s`` the last alpha-update denominator (after a log-domain iteration or
an absorption ``s = a``, so the second term vanishes exactly, also for subnormal masses), likewise
for ``beta``. Loss, error, stopping and the fused KD forward are those of
:mod:`.triton_scaling`.

Layout: a program loops over ``rows_per_prog`` consecutive rows; the cost tile is loaded from
global memory (L1/L2) only when a log-domain step or an absorption needs it, so registers hold
``Kt`` and the row's vectors only.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import (
    count_bad,
    domain_ok,
    envelope_grad_vector,
    load_marginal_vector,
)

DO_NOT_SPECIALIZE = ("sa0", "sa1", "sb0", "sb1", "B", "m", "n", "n_iters", "check_every",
                     "rows_per_prog")


@triton.jit(do_not_specialize=("sm0", "sm1", "sm2", "m", "n"))
def scaled_cost_kernel(m_ptr, sm0, sm1, sm2, c_ptr, bad_ptr, m, n, scale_arg: tl.float64,
                       BM: tl.constexpr, BN: tl.constexpr):
    """Problem ``pid`` of the cost (``sm0 = 0`` for a shared cost): ``C = M log2(e) / eps`` into a
    padded (BM, BN) block of ``c`` (+inf in padding, so the kernel entry there is 0), and the
    number of NaN or inf entries into ``bad[pid]``. Padded rows let the solve read ``C`` without
    masks, contiguously, which is what gives its tiles a vectorised register layout."""
    CD: tl.constexpr = c_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    oi = tl.arange(0, BM)
    oj = tl.arange(0, BN)
    mask = (oi < m)[:, None] & (oj < n)[None, :]
    M = tl.load(m_ptr + pid * sm0 + oi[:, None].to(tl.int64) * sm1
                + oj[None, :].to(tl.int64) * sm2, mask=mask, other=0.0).to(CD)
    tl.store(c_ptr + pid * (BM * BN) + (oi[:, None] * BN + oj[None, :]),
             tl.where(mask, M * tl.cast(scale_arg, CD), float("inf")))
    tl.store(bad_ptr + pid, count_bad(M, mask))


@triton.jit
def _scaled_cost(c_blk, oi, oj, BN: tl.constexpr):
    return tl.load(c_blk + (oi[:, None] * BN + oj[None, :]))


@triton.jit
def _lse2(x, AXIS: tl.constexpr):
    """(max, log2 of the shifted sum) along AXIS; an all -inf slice gives (0, -inf)."""
    mx = tl.max(x, AXIS)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    return mx, tl.log2(tl.sum(tl.exp2(x - tl.expand_dims(mx, AXIS)), AXIS))


@triton.jit
def _log_iteration(c_blk, oi, oj, pa, la, pb, lb, g, BN: tl.constexpr):
    """One log-domain iteration from ``g`` (absorbed ``log2 v`` included): returns ``(f, g, Kt)``
    with ``Kt = exp2(f + g - C)``, formed from the beta-update's exponentials. The cost tile is
    read once per log-sum-exp rather than kept, so this rare path adds no live tile."""
    mx, ls = _lse2(g[None, :] - _scaled_cost(c_blk, oi, oj, BN), 1)
    f = tl.where(pa > 0, la - (mx + ls), float("-inf"))
    y = f[:, None] - _scaled_cost(c_blk, oi, oj, BN)
    my = tl.max(y, 0)
    my = tl.where(my == float("-inf"), 0.0, my)
    E = tl.exp2(y - my[None, :])
    cs = tl.sum(E, 0)
    g = tl.where(pb > 0, lb - (my + tl.log2(cs)), float("-inf"))
    # Kt_ij = exp2(f_i + g_j - C_ij) = E_ij * 2^(my_j + g_j) = E_ij * b_j / cs_j
    return f, g, E * tl.where(pb > 0, pb / cs, 0.0)[None, :]


@triton.jit
def _valid(den, p, floor):
    """Whether a scaling step's denominators can be trusted at every entry of positive mass."""
    bad = (p > 0) & ~((den >= floor) & (den < float("inf")))
    return tl.sum(bad.to(tl.int32), 0) == 0


@triton.jit
def _out_of_bounds(x, lo_b, hi_b):
    return tl.sum(((x > 0) & ((x > hi_b) | (x < lo_b))).to(tl.int32), 0) > 0


@triton.jit
def _scaling_steps(Kt, pa, pb, s, c, t, n_iters, check_every, tol, floor, lo_b, hi_b,
                   HAS_TOL: tl.constexpr):
    """Plain scaling iterations on a fixed ``Kt`` (the hot loop: no exponential), until the
    solve is done or a step is invalid (denominators not trustworthy: nothing is accepted) or
    leaves the scaling bounds (accepted, absorption due). Returns ``(s, c, t, stop, ok, v_prev)``
    with ``v_prev`` the scaling ``v`` before the rejected step."""
    ok = t >= 0
    stop = t < 0
    go = t < n_iters
    v = tl.where(pb > 0, pb / c, 0.0)
    while go:
        u = tl.where(pa > 0, pa / s, 0.0)
        v = tl.where(pb > 0, pb / c, 0.0)
        s_new = tl.sum(Kt * v[None, :], 1)
        if HAS_TOL:
            if (t % check_every) == 0:
                stop = tl.sum(tl.abs(u * s_new - pa), 0) <= tol
        u = tl.where(pa > 0, pa / s_new, 0.0)
        c_new = tl.sum(Kt * u[:, None], 0)
        ok = _valid(s_new, pa, floor) & _valid(c_new, pb, floor)
        take = ok & (stop == 0)
        s = tl.where(take, s_new, s)
        c = tl.where(take, c_new, c)
        t += take.to(tl.int32)
        inside = ~(_out_of_bounds(u, lo_b, hi_b) | _out_of_bounds(pb / c_new, lo_b, hi_b))
        go = take & inside & (t < n_iters)
    return s, c, t, stop, ok, v


@triton.jit
def _solve_row(c_blk, oi, oj, pa, pb, n_iters, check_every, tol, floor, lo_b, hi_b,
               BN: tl.constexpr, HAS_TOL: tl.constexpr):
    """The whole solve of one row: returns ``(f, g, s, c, Kt, iters)``, the state after the last
    iteration (``u = a / s``, ``v = b / c``). Runs of scaling steps alternate with an absorption
    (scalings out of bounds) or a log-domain iteration (a rejected step, and the first one)."""
    la = tl.log2(pa)
    lb = tl.log2(pb)
    f, g, Kt = _log_iteration(c_blk, oi, oj, pa, la, pb, lb, tl.zeros_like(pb), BN)
    s = pa
    c = pb
    t = 1
    go = t < n_iters
    while go:
        s, c, t, stop, ok, v = _scaling_steps(Kt, pa, pb, s, c, t, n_iters, check_every, tol,
                                              floor, lo_b, hi_b, HAS_TOL)
        go = (t < n_iters) & (stop == 0)
        if go:
            if ok:
                f = f + tl.log2(tl.where(pa > 0, pa / s, 0.0))
                g = g + tl.log2(tl.where(pb > 0, pb / c, 0.0))
                Kt = tl.exp2(f[:, None] + g[None, :] - _scaled_cost(c_blk, oi, oj, BN))
            else:
                f, g, Kt = _log_iteration(c_blk, oi, oj, pa, la, pb, lb, g + tl.log2(v), BN)
                t += 1
            s = pa
            c = pb
            go = t < n_iters
    return f, g, s, c, Kt, t


@triton.jit
def _write_row(r64, f, g, s, c, Kt, t, pa, pb, oi, oj, mi, mj, m, n, unit, eps, inv_tau, bad,
               alpha_ptr, beta_ptr, loss_ptr, iters_ptr, err_ptr, gt_ptr, gs_ptr,
               KD: tl.constexpr, TEACHER_GRAD: tl.constexpr):
    """Potentials, loss, error, iteration count and (KD) envelope gradients of one row; all
    but the count NaN on a ``bad`` row."""
    u = tl.where(pa > 0, pa / s, 0.0)
    v = tl.where(pb > 0, pb / c, 0.0)
    r = u * tl.sum(Kt * v[None, :], 1)
    alpha = tl.where(pa > 0, unit * (f + tl.log2(pa) - tl.log2(s)), float("-inf"))
    beta = tl.where(pb > 0, unit * (g + tl.log2(pb) - tl.log2(c)), float("-inf"))
    loss = (tl.sum(tl.where(pa > 0, alpha * r, 0.0), 0)
            + tl.sum(tl.where(pb > 0, beta * pb, 0.0), 0) - eps * tl.sum(r, 0))
    err = tl.sum(tl.abs(r - pa), 0)
    tl.store(alpha_ptr + r64 * m + oi, tl.where(bad, float("nan"), alpha), mask=mi)
    tl.store(beta_ptr + r64 * n + oj, tl.where(bad, float("nan"), beta), mask=mj)
    tl.store(loss_ptr + r64, tl.where(bad, float("nan"), loss))
    tl.store(err_ptr + r64, tl.where(bad, float("nan"), err))
    tl.store(iters_ptr + r64, t)
    if KD:
        gs = envelope_grad_vector(beta, pb, inv_tau)
        tl.store(gs_ptr + r64 * n + oj, tl.where(bad, float("nan"), gs), mask=mj)
        if TEACHER_GRAD:
            gt = envelope_grad_vector(alpha, pa, inv_tau)
            tl.store(gt_ptr + r64 * m + oi, tl.where(bad, float("nan"), gt), mask=mi)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def stabilized_kernel(
        a_ptr, sa0, sa1, b_ptr, sb0, sb1, c_ptr, cbad_ptr, lo_ptr, hi_ptr,
        alpha_ptr, beta_ptr, loss_ptr, iters_ptr, err_ptr, gt_ptr, gs_ptr,
        B, m, n, n_iters, check_every, rows_per_prog,
        eps_arg: tl.float64, unit_arg: tl.float64, inv_tau_arg: tl.float64,
        zscale_arg: tl.float64, tol_arg: tl.float64,
        max_range: tl.float64, floor_arg: tl.float64, bound_arg: tl.float64,
        BM: tl.constexpr, BN: tl.constexpr, KD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
        HAS_TOL: tl.constexpr, SHARED: tl.constexpr, DOMAIN: tl.constexpr):
    """Rows ``[pid * rows_per_prog, ...)`` one after another (module docstring). ``DOMAIN == 2``:
    run only where the reference's ``method="auto"`` picks the log domain (the scaling kernel
    of the same call runs otherwise). ``c``: the padded scaled cost of
    :func:`scaled_cost_kernel` (one block, or one per row), ``cbad`` its bad-entry counts;
    ``unit = eps ln 2``; ``floor`` and ``bound``: the validity floor of a scaling step's
    denominators and the absorption bound of the scalings (module docstring)."""
    CD: tl.constexpr = alpha_ptr.dtype.element_ty
    run, _ = domain_ok(lo_ptr, hi_ptr, eps_arg, max_range, DOMAIN)
    if run:
        eps = tl.cast(eps_arg, CD)
        zscale = tl.cast(zscale_arg, CD)
        tol = tl.cast(tol_arg, CD)
        floor = tl.cast(floor_arg, CD)
        hi_b = tl.cast(bound_arg, CD)
        oi = tl.arange(0, BM)
        oj = tl.arange(0, BN)
        mi = oi < m
        mj = oj < n
        row0 = tl.program_id(0).to(tl.int64) * rows_per_prog
        for rr in range(rows_per_prog):
            r64 = row0 + rr
            if r64 < B:
                if SHARED:
                    c_blk = c_ptr
                    cbad = tl.load(cbad_ptr)
                else:
                    c_blk = c_ptr + r64 * (BM * BN)
                    cbad = tl.load(cbad_ptr + r64)
                pa, abad = load_marginal_vector(a_ptr + r64 * sa0, sa1, oi, mi, zscale, KD, CD)
                pb, bbad = load_marginal_vector(b_ptr + r64 * sb0, sb1, oj, mj, zscale, KD, CD)
                f, g, s, c, Kt, t = _solve_row(c_blk, oi, oj, pa, pb, n_iters, check_every, tol,
                                               floor, 1.0 / hi_b, hi_b, BN, HAS_TOL)
                _write_row(r64, f, g, s, c, Kt, t, pa, pb, oi, oj, mi, mj, m, n,
                           tl.cast(unit_arg, CD), eps, tl.cast(inv_tau_arg, CD),
                           (abad + bbad + cbad) > 0, alpha_ptr, beta_ptr, loss_ptr, iters_ptr,
                           err_ptr, gt_ptr, gs_ptr, KD, TEACHER_GRAD)
