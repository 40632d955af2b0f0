r"""Log-domain Sinkhorn walking the cost in tiles: the Triton backend's fallback for problems
that are neither on the scaling path (small eps, i.e. the reference's log domain, or per-row
costs) nor small enough for the stabilised kernel's per-row tile (``pow2(m) * pow2(n) > 128^2``),
e.g. ``sharp`` eps with 1000 classes (docs/gpu.md).

Mathematics (the reference's ``solve_log``; paper 1, Eq. 20 in the log domain). In base-2 units
of eps, ``f = alpha log2(e) / eps``, ``g = beta log2(e) / eps``, ``C = M log2(e) / eps``::

    f_i <- log2 a_i - LSE2_j(g_j - C_ij),     g_j <- log2 b_j - LSE2_i(f_i - C_ij)

from ``f = g = 0``; every log-sum-exp runs over tiles with a running maximum and a rescaled running
sum, so nothing under- or overflows for any eps. ``r_i = exp2(f_i + LSE2_j(g_j - C_ij))`` after
the last beta-update gives the loss ``<alpha, r> + <beta, b> - eps sum(r)`` and the error
``||r - a||_1``; the row log-sum-exp that gives ``r`` is the one the next alpha-update needs, so
checking ``tol`` costs no extra pass. Fused KD forward and envelope gradients as in
:mod:`.triton_scaling`.

Layout: a program handles ``rows_per_prog`` rows one after another. A row's potentials and its
row log-sum-exps live in per-call scratch (``f``, ``g``, ``lse``), separate from the outputs;
every phase that reads what another thread wrote is separated by a barrier, and nothing is
loaded and stored back to the same address within a phase.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import count_bad, domain_ok, online_lse

DO_NOT_SPECIALIZE = ("sa0", "sa1", "sb0", "sb1", "sm0", "sm1", "sm2", "B", "m", "n", "n_iters",
                     "check_every", "rows_per_prog")


@triton.jit
def _logit_shift(ptr, stride, size, zscale, BLOCK: tl.constexpr, CD: tl.constexpr):
    """log2 of the softmax normaliser of ``z * zscale`` over one row (online, tiles of BLOCK)."""
    ar = tl.arange(0, BLOCK)
    run_max = tl.full([BLOCK], float("-inf"), CD)
    run_sum = tl.zeros([BLOCK], CD)
    for s in range(0, size, BLOCK):
        offs = s + ar
        z = tl.load(ptr + offs.to(tl.int64) * stride, mask=offs < size,
                    other=float("-inf")).to(CD) * zscale
        new_max = tl.maximum(run_max, z)
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        run_sum = run_sum * tl.exp2(run_max - safe) + tl.exp2(z - safe)
        run_max = new_max
    top = tl.max(run_max, 0)
    top_safe = tl.where(top == float("-inf"), 0.0, top)
    return top_safe + tl.log2(tl.sum(run_sum * tl.exp2(run_max - top_safe), 0))


@triton.jit
def _log_marginal(ptr, stride, offs, mask, zscale, shift, KD: tl.constexpr, CD: tl.constexpr):
    """(log2 p, p, number of bad inputs) for one tile of a marginal. KD: the temperature
    softmax of logits; probabilities that underflow to 0 get log2 p = -inf."""
    if KD:
        z = tl.load(ptr + offs.to(tl.int64) * stride, mask=mask, other=0.0).to(CD)
        lp = z * zscale - shift
        p = tl.exp2(lp)
        lp = tl.where(mask & (p > 0), lp, float("-inf"))
        p = tl.where(mask, p, 0.0)
        bad = tl.sum(tl.where(mask & ((z != z) | (z == float("inf"))), 1, 0), 0)
        bad += tl.where((shift != shift) | (shift == float("-inf")), 1, 0)
    else:
        p = tl.load(ptr + offs.to(tl.int64) * stride, mask=mask, other=0.0).to(CD)
        lp = tl.log2(p)
        bad = tl.sum(tl.where(mask & ~((p == p) & (tl.abs(p) < float("inf"))), 1, 0), 0)
    return lp, p, bad


@triton.jit
def _cost_tile(c_row, s1, s2, oi, oj, mask, scale):
    """Scaled cost tile (+inf in padding, so it drops out of every log-sum-exp)."""
    c = tl.load(c_row + oi[:, None].to(tl.int64) * s1 + oj[None, :].to(tl.int64) * s2, mask=mask,
                other=float("inf"))
    return c.to(scale.dtype) * scale


@triton.jit
def _row_pass(a_row, sa1, c_row, s1, s2, f_row, g_row, lse_row, m, n, scale, zscale, shift_a,
              BM: tl.constexpr, BN: tl.constexpr, KD: tl.constexpr, CD: tl.constexpr):
    """``lse_i = LSE2_j(g_j - C_ij)`` for every i (stored) and ``||exp2(f + lse) - a||_1``."""
    ai = tl.arange(0, BM)
    aj = tl.arange(0, BN)
    err = tl.sum(tl.zeros([BM], CD), 0)
    for i0 in range(0, m, BM):
        oi = i0 + ai
        mi = oi < m
        run_max = tl.full([BM], float("-inf"), CD)
        run_sum = tl.zeros([BM], CD)
        for j0 in range(0, n, BN):
            oj = j0 + aj
            mj = oj < n
            g = tl.load(g_row + oj, mask=mj, other=float("-inf"))
            x = g[None, :] - _cost_tile(c_row, s1, s2, oi, oj, mi[:, None] & mj[None, :], scale)
            run_max, run_sum = online_lse(run_max, run_sum, x, 1)
        lse = tl.where(run_max == float("-inf"), 0.0, run_max) + tl.log2(run_sum)
        tl.store(lse_row + oi, lse, mask=mi)
        f = tl.load(f_row + oi, mask=mi, other=float("-inf"))
        _, pa, _ = _log_marginal(a_row, sa1, oi, mi, zscale, shift_a, KD, CD)
        err += tl.sum(tl.where(mi, tl.abs(tl.exp2(f + lse) - pa), 0.0), 0)
    return err


@triton.jit
def _alpha_update(a_row, sa1, f_row, lse_row, m, zscale, shift_a, BM: tl.constexpr,
                  KD: tl.constexpr, CD: tl.constexpr):
    """``f = log2 a - lse`` from the stored row log-sum-exps (-inf kept for zero mass)."""
    ai = tl.arange(0, BM)
    for i0 in range(0, m, BM):
        oi = i0 + ai
        mi = oi < m
        la, _, _ = _log_marginal(a_row, sa1, oi, mi, zscale, shift_a, KD, CD)
        lse = tl.load(lse_row + oi, mask=mi, other=float("-inf"))
        tl.store(f_row + oi, tl.where(la == float("-inf"), float("-inf"), la - lse), mask=mi)


@triton.jit
def _beta_update(b_row, sb1, c_row, s1, s2, f_row, g_row, m, n, scale, zscale, shift_b,
                 BM: tl.constexpr, BN: tl.constexpr, KD: tl.constexpr, CD: tl.constexpr):
    """``g_j = log2 b_j - LSE2_i(f_i - C_ij)``, column tile by column tile."""
    ai = tl.arange(0, BM)
    aj = tl.arange(0, BN)
    for j0 in range(0, n, BN):
        oj = j0 + aj
        mj = oj < n
        run_max = tl.full([BN], float("-inf"), CD)
        run_sum = tl.zeros([BN], CD)
        for i0 in range(0, m, BM):
            oi = i0 + ai
            mi = oi < m
            f = tl.load(f_row + oi, mask=mi, other=float("-inf"))
            x = f[:, None] - _cost_tile(c_row, s1, s2, oi, oj, mi[:, None] & mj[None, :], scale)
            run_max, run_sum = online_lse(run_max, run_sum, x, 0)
        lb, _, _ = _log_marginal(b_row, sb1, oj, mj, zscale, shift_b, KD, CD)
        lse = tl.where(run_max == float("-inf"), 0.0, run_max) + tl.log2(run_sum)
        tl.store(g_row + oj, tl.where(lb == float("-inf"), float("-inf"), lb - lse), mask=mj)


@triton.jit
def _finish_source(a_row, sa1, f_row, lse_row, alpha_out, gt_out, m, unit, zscale, shift_a,
                   inv_tau, BM: tl.constexpr, KD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                   CD: tl.constexpr):
    """alpha and its loss terms ``<alpha, r> - eps sum(r)`` (returned as ``(sum alpha r,
    sum r, bad)``), then the teacher envelope gradient from ``<alpha, p_T>``."""
    ai = tl.arange(0, BM)
    ar = tl.sum(tl.zeros([BM], CD), 0)
    rs = tl.sum(tl.zeros([BM], CD), 0)
    at = tl.sum(tl.zeros([BM], CD), 0)
    bad = tl.sum(tl.zeros([BM], tl.int32), 0)
    for i0 in range(0, m, BM):
        oi = i0 + ai
        mi = oi < m
        _, pa, nb = _log_marginal(a_row, sa1, oi, mi, zscale, shift_a, KD, CD)
        bad += nb
        f = tl.load(f_row + oi, mask=mi, other=float("-inf"))
        r = tl.where(mi, tl.exp2(f + tl.load(lse_row + oi, mask=mi, other=float("-inf"))), 0.0)
        alpha = f * unit
        tl.store(alpha_out + oi, alpha, mask=mi)
        ar += tl.sum(tl.where(pa > 0, alpha * r, 0.0), 0)
        at += tl.sum(tl.where(pa > 0, alpha * pa, 0.0), 0)
        rs += tl.sum(r, 0)
    if KD:
        if TEACHER_GRAD:
            for i0 in range(0, m, BM):
                oi = i0 + ai
                mi = oi < m
                _, pa, _ = _log_marginal(a_row, sa1, oi, mi, zscale, shift_a, KD, CD)
                phi = tl.where(pa > 0, tl.load(f_row + oi, mask=mi, other=0.0) * unit, 0.0)
                tl.store(gt_out + oi, (phi - at) * pa * inv_tau, mask=mi)
    return ar, rs, bad


@triton.jit
def _finish_target(b_row, sb1, g_row, beta_out, gs_out, n, unit, zscale, shift_b, inv_tau,
                   BN: tl.constexpr, KD: tl.constexpr, CD: tl.constexpr):
    """beta, ``<beta, b>`` (returned with the bad-input count) and the student gradient."""
    aj = tl.arange(0, BN)
    bb = tl.sum(tl.zeros([BN], CD), 0)
    bad = tl.sum(tl.zeros([BN], tl.int32), 0)
    for j0 in range(0, n, BN):
        oj = j0 + aj
        mj = oj < n
        _, pb, nb = _log_marginal(b_row, sb1, oj, mj, zscale, shift_b, KD, CD)
        bad += nb
        beta = tl.load(g_row + oj, mask=mj, other=float("-inf")) * unit
        tl.store(beta_out + oj, beta, mask=mj)
        bb += tl.sum(tl.where(pb > 0, beta * pb, 0.0), 0)
    if KD:
        for j0 in range(0, n, BN):
            oj = j0 + aj
            mj = oj < n
            _, pb, _ = _log_marginal(b_row, sb1, oj, mj, zscale, shift_b, KD, CD)
            phi = tl.where(pb > 0, tl.load(g_row + oj, mask=mj, other=0.0) * unit, 0.0)
            tl.store(gs_out + oj, (phi - bb) * pb * inv_tau, mask=mj)
    return bb, bad


@triton.jit
def _count_bad_cost(c_row, s1, s2, m, n, BM: tl.constexpr, BN: tl.constexpr):
    ai = tl.arange(0, BM)
    aj = tl.arange(0, BN)
    bad = tl.sum(tl.zeros([BM], tl.int32), 0)
    for i0 in range(0, m, BM):
        for j0 in range(0, n, BN):
            oi = i0 + ai
            oj = j0 + aj
            mask = (oi < m)[:, None] & (oj < n)[None, :]
            c = tl.load(c_row + oi[:, None].to(tl.int64) * s1 + oj[None, :].to(tl.int64) * s2,
                        mask=mask, other=0.0)
            bad += count_bad(c, mask)
    return bad


@triton.jit
def _poison_row(alpha_row, beta_row, gt_row, gs_row, m, n, BM: tl.constexpr, BN: tl.constexpr,
                KD: tl.constexpr, TEACHER_GRAD: tl.constexpr, CD: tl.constexpr):
    """NaN over a bad row's potentials (and KD gradients), as the reference writes them: the
    bad-input count is only known once :func:`_finish_source` and :func:`_finish_target` have
    stored their values, so this overwrites them after a barrier."""
    nan_m = tl.full([BM], float("nan"), CD)
    nan_n = tl.full([BN], float("nan"), CD)
    for i0 in range(0, m, BM):
        oi = i0 + tl.arange(0, BM)
        tl.store(alpha_row + oi, nan_m, mask=oi < m)
        if KD:
            if TEACHER_GRAD:
                tl.store(gt_row + oi, nan_m, mask=oi < m)
    for j0 in range(0, n, BN):
        oj = j0 + tl.arange(0, BN)
        tl.store(beta_row + oj, nan_n, mask=oj < n)
        if KD:
            tl.store(gs_row + oj, nan_n, mask=oj < n)


@triton.jit
def _init_row(f_row, g_row, m, n, BM: tl.constexpr, BN: tl.constexpr, CD: tl.constexpr):
    for i0 in range(0, m, BM):
        tl.store(f_row + i0 + tl.arange(0, BM), tl.zeros([BM], CD), mask=i0 + tl.arange(0, BM) < m)
    for j0 in range(0, n, BN):
        tl.store(g_row + j0 + tl.arange(0, BN), tl.zeros([BN], CD), mask=j0 + tl.arange(0, BN) < n)


@triton.jit
def _solve_row(a_row, sa1, b_row, sb1, c_row, s1, s2, f_row, g_row, lse_row, m, n, n_iters,
               check_every, scale, zscale, shift_a, shift_b, tol, BM: tl.constexpr,
               BN: tl.constexpr, KD: tl.constexpr, HAS_TOL: tl.constexpr, CD: tl.constexpr):
    """The iterations of one row; returns ``(iterations, error)``."""
    _init_row(f_row, g_row, m, n, BM, BN, CD)
    tl.debug_barrier()
    err = _row_pass(a_row, sa1, c_row, s1, s2, f_row, g_row, lse_row, m, n, scale, zscale,
                    shift_a, BM, BN, KD, CD)
    tl.debug_barrier()
    t = 0
    go = t < n_iters
    while go:
        _alpha_update(a_row, sa1, f_row, lse_row, m, zscale, shift_a, BM, KD, CD)
        tl.debug_barrier()
        _beta_update(b_row, sb1, c_row, s1, s2, f_row, g_row, m, n, scale, zscale, shift_b, BM,
                     BN, KD, CD)
        tl.debug_barrier()
        t += 1
        err = _row_pass(a_row, sa1, c_row, s1, s2, f_row, g_row, lse_row, m, n, scale, zscale,
                        shift_a, BM, BN, KD, CD)
        tl.debug_barrier()
        stop = t >= n_iters
        if HAS_TOL:
            stop = stop | (((t % check_every) == 0) & (err <= tol))
        go = stop == 0
    return t, err


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def log_streamed_kernel(
        a_ptr, sa0, sa1, b_ptr, sb0, sb1, m_ptr, sm0, sm1, sm2, lo_ptr, hi_ptr,
        f_ptr, g_ptr, lse_ptr, alpha_ptr, beta_ptr, loss_ptr, iters_ptr, err_ptr, gt_ptr, gs_ptr,
        B, m, n, n_iters, check_every, rows_per_prog,
        eps_arg: tl.float64, unit_arg: tl.float64, scale_arg: tl.float64,
        inv_tau_arg: tl.float64, zscale_arg: tl.float64, tol_arg: tl.float64,
        max_range: tl.float64,
        BM: tl.constexpr, BN: tl.constexpr, KD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
        HAS_TOL: tl.constexpr, SHARED: tl.constexpr, DOMAIN: tl.constexpr):
    """Rows ``[pid * rows_per_prog, ...)`` one after another (module docstring). ``f``, ``g``,
    ``lse``: scratch of the output shapes. ``DOMAIN == 2``: only where the reference's
    ``method="auto"`` picks the log domain."""
    CD: tl.constexpr = alpha_ptr.dtype.element_ty
    run, _ = domain_ok(lo_ptr, hi_ptr, eps_arg, max_range, DOMAIN)
    if run:
        eps = tl.cast(eps_arg, CD)
        unit = tl.cast(unit_arg, CD)
        scale = tl.cast(scale_arg, CD)
        zscale = tl.cast(zscale_arg, CD)
        inv_tau = tl.cast(inv_tau_arg, CD)
        tol = tl.cast(tol_arg, CD)
        if SHARED:
            cbad = _count_bad_cost(m_ptr, sm1, sm2, m, n, BM, BN)
        row0 = tl.program_id(0).to(tl.int64) * rows_per_prog
        for rr in range(rows_per_prog):
            r64 = row0 + rr
            if r64 < B:
                a_row = a_ptr + r64 * sa0
                b_row = b_ptr + r64 * sb0
                c_row = m_ptr + r64 * sm0
                if not SHARED:
                    cbad = _count_bad_cost(c_row, sm1, sm2, m, n, BM, BN)
                shift_a = 0.0
                shift_b = 0.0
                if KD:
                    shift_a = _logit_shift(a_row, sa1, m, zscale, BM, CD)
                    shift_b = _logit_shift(b_row, sb1, n, zscale, BN, CD)
                t, err = _solve_row(a_row, sa1, b_row, sb1, c_row, sm1, sm2, f_ptr + r64 * m,
                                    g_ptr + r64 * n, lse_ptr + r64 * m, m, n, n_iters,
                                    check_every, scale, zscale, shift_a, shift_b, tol, BM, BN, KD,
                                    HAS_TOL, CD)
                ar, rs, abad = _finish_source(a_row, sa1, f_ptr + r64 * m, lse_ptr + r64 * m,
                                              alpha_ptr + r64 * m, gt_ptr + r64 * m, m, unit,
                                              zscale, shift_a, inv_tau, BM, KD, TEACHER_GRAD, CD)
                bb, bbad = _finish_target(b_row, sb1, g_ptr + r64 * n, beta_ptr + r64 * n,
                                          gs_ptr + r64 * n, n, unit, zscale, shift_b, inv_tau,
                                          BN, KD, CD)
                bad = (abad + bbad + cbad) > 0
                tl.store(loss_ptr + r64, tl.where(bad, float("nan"), ar + bb - eps * rs))
                tl.store(err_ptr + r64, tl.where(bad, float("nan"), err))
                tl.store(iters_ptr + r64, t)
                tl.debug_barrier()
                if bad:
                    _poison_row(alpha_ptr + r64 * m, beta_ptr + r64 * n, gt_ptr + r64 * m,
                                gs_ptr + r64 * n, m, n, BM, BN, KD, TEACHER_GRAD, CD)
                    tl.debug_barrier()
