r"""Row-block helpers of the scaling kernels that walk the classes in tiles of ``BT`` columns:
the marginals (or KD softmaxes, paper 1, Eq. 10) into padded scratch before the solve, and the
potentials, loss, error and envelope gradients (Prop. 4.2) after it, from the state the solve
leaves in scratch (see :mod:`.triton_scaling` for the formulas). Working tile by tile keeps
their register use small next to the iteration's.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import online_lse


@triton.jit
def rows_tile(ptr, r0, lr, cols, ld):
    """Rows ``r0 + lr`` x ``cols`` of a padded scratch buffer with rows of length ``ld``: the
    block's base is formed once in 64 bits, offsets inside it stay 32-bit (fewer registers)."""
    return tl.load((ptr + r0 * ld) + (lr[:, None] * ld + cols[None, :]))


@triton.jit
def store_rows_tile(ptr, r0, lr, cols, ld, x, rows_mask):
    tl.store((ptr + r0 * ld) + (lr[:, None] * ld + cols[None, :]), x, mask=rows_mask[:, None])


@triton.jit
def row_softmax_scale(ptr, s0, s1, r0, lr, row_ok, size, zscale, BB: tl.constexpr,
                   BT: tl.constexpr, CD: tl.constexpr):
    """Per-row maximum of ``z * zscale`` and the sum of ``exp2(z * zscale - max)``, over the
    whole row in tiles of BT (online rescaling), for the KD softmax."""
    run_max = tl.full([BB], float("-inf"), CD)
    run_sum = tl.zeros([BB], CD)
    for c0 in range(0, size, BT):
        cols = c0 + tl.arange(0, BT)
        mask = row_ok[:, None] & (cols < size)[None, :]
        z = tl.load(ptr + (r0 + lr)[:, None].to(tl.int64) * s0 + cols[None, :].to(tl.int64) * s1,
                    mask=mask, other=float("-inf")).to(CD) * zscale
        run_max, run_sum = online_lse(run_max, run_sum, z, 1)
    return tl.where(run_max == float("-inf"), 0.0, run_max), run_max == float("-inf"), run_sum


@triton.jit
def prepare_side(ptr, s0, s1, p_ptr, x_ptr, ld, r0, lr, row_ok, size, zscale,
                  BB: tl.constexpr, BT: tl.constexpr, KD: tl.constexpr, CD: tl.constexpr):
    """One marginal of a row block into the padded scratch ``p`` (zeros beyond ``size``) and the
    starting scaling (1 on real classes) into ``x``; returns the per-row count of bad inputs."""
    if KD:
        top, empty, total = row_softmax_scale(ptr, s0, s1, r0, lr, row_ok, size, zscale, BB, BT,
                                              CD)
        # exponentials taken 2^64 too large and scaled back after: subnormal probabilities
        # survive the flush-to-zero of the fast exp2 (torch.softmax keeps them)
        inv = 1.0 / (total * 18446744073709551616.0)
        bad = (row_ok & empty).to(tl.int32)
    else:
        bad = tl.zeros([BB], tl.int32)
    for c0 in range(0, ld, BT):
        cols = c0 + tl.arange(0, BT)
        mask = row_ok[:, None] & (cols < size)[None, :]
        offs = (r0 + lr)[:, None].to(tl.int64) * s0 + cols[None, :].to(tl.int64) * s1
        if KD:
            z = tl.load(ptr + offs, mask=mask, other=float("-inf")).to(CD)
            p = tl.exp2(z * zscale - top[:, None] + 64.0) * inv[:, None]
            odd = mask & ((z != z) | (z == float("inf")))
        else:
            p = tl.load(ptr + offs, mask=mask, other=0.0).to(CD)
            odd = mask & ~((p == p) & (tl.abs(p) < float("inf")))
        bad += tl.sum(odd.to(tl.int32), 1)
        local = (r0 * ld) + (lr[:, None] * ld + cols[None, :])
        tl.store(p_ptr + local, tl.where(mask, p, 0.0))
        tl.store(x_ptr + local, tl.where((cols < size)[None, :], 1.0, 0.0).to(CD))
    return bad


@triton.jit
def side_sums(p_ptr, d_ptr, r_ptr, ld, r0, lr, size, unit, shift, BB: tl.constexpr,
               BT: tl.constexpr, SOURCE: tl.constexpr, CD: tl.constexpr):
    """Per-row sums over a side, tile by tile: ``(sum phi * w, sum phi * p, sum r, sum |r - p|)``
    with ``phi = unit (log2 p - log2 d) + shift`` and ``w = r`` (source) or ``w = p``."""
    tw = tl.zeros([BB], CD)
    tp = tl.zeros([BB], CD)
    tr = tl.zeros([BB], CD)
    te = tl.zeros([BB], CD)
    for c0 in range(0, ld, BT):
        cols = c0 + tl.arange(0, BT)
        p = rows_tile(p_ptr, r0, lr, cols, ld)
        phi = tl.where(p > 0, unit * (tl.log2(p) - tl.log2(rows_tile(d_ptr, r0, lr, cols, ld)))
                       + shift, 0.0)
        if SOURCE:
            r = tl.where((cols < size)[None, :], rows_tile(r_ptr, r0, lr, cols, ld), 0.0)
            tw += tl.sum(phi * r, 1)
            tr += tl.sum(r, 1)
            te += tl.sum(tl.abs(r - p), 1)
        else:
            tw += tl.sum(phi * p, 1)
        tp += tl.sum(phi * p, 1)
    return tw, tp, tr, te


@triton.jit
def side_outputs(p_ptr, d_ptr, ld, r0, lr, row_ok, size, unit, shift, mean, inv_tau, bad,
                  pot_ptr, grad_ptr, BT: tl.constexpr, GRAD: tl.constexpr):
    """Potentials (and with GRAD the envelope gradients, ``mean = <phi, p>``) of one side;
    NaN throughout on ``bad`` rows, as the reference writes them."""
    for c0 in range(0, ld, BT):
        cols = c0 + tl.arange(0, BT)
        p = rows_tile(p_ptr, r0, lr, cols, ld)
        phi = tl.where(p > 0, unit * (tl.log2(p) - tl.log2(rows_tile(d_ptr, r0, lr, cols, ld)))
                       + shift, float("-inf"))
        mask = row_ok[:, None] & (cols < size)[None, :]
        local = (r0 * size) + (lr[:, None] * size + cols[None, :])
        tl.store(pot_ptr + local, tl.where(bad[:, None], float("nan"), phi), mask=mask)
        if GRAD:
            g = (tl.where(p > 0, phi, 0.0) - mean[:, None]) * p * inv_tau
            tl.store(grad_ptr + local, tl.where(bad[:, None], float("nan"), g), mask=mask)


@triton.jit
def finish_rows(pa_ptr, pb_ptr, s_ptr, c_ptr, r_ptr, ldm, ldn, r0, lr, row_ok, m, n, bad, iters,
                shift, eps, unit, inv_tau, alpha_ptr, beta_ptr, loss_ptr, iters_ptr, err_ptr,
                gt_ptr, gs_ptr, BB: tl.constexpr, BT: tl.constexpr, KD: tl.constexpr,
                TEACHER_GRAD: tl.constexpr, CD: tl.constexpr):
    """All outputs of a row block: ``alpha = eps (log a - log s) + shift``, ``beta = eps (log b -
    log c)`` (as ``unit = eps ln 2`` times base-2 logarithms), the loss ``<alpha, r> + <beta, b> -
    eps sum(r)``, the error ``||r - a||_1`` (``r``: the final plan's row sums, in ``r_ptr``), the
    iteration counts and (KD) the envelope gradients; ``bad`` rows report NaN in all of them
    but the iteration count."""
    aw, ap, rs, err = side_sums(pa_ptr, s_ptr, r_ptr, ldm, r0, lr, m, unit, shift, BB, BT, True,
                                CD)
    bw, bp, _, _ = side_sums(pb_ptr, c_ptr, r_ptr, ldn, r0, lr, n, unit, 0.0, BB, BT, False, CD)
    side_outputs(pa_ptr, s_ptr, ldm, r0, lr, row_ok, m, unit, shift, ap, inv_tau, bad,
                 alpha_ptr, gt_ptr, BT, KD and TEACHER_GRAD)
    side_outputs(pb_ptr, c_ptr, ldn, r0, lr, row_ok, n, unit, 0.0, bp, inv_tau, bad, beta_ptr,
                 gs_ptr, BT, KD)
    tl.store((loss_ptr + r0) + lr, tl.where(bad, float("nan"), aw + bw - eps * rs), mask=row_ok)
    tl.store((err_ptr + r0) + lr, tl.where(bad, float("nan"), err), mask=row_ok)
    tl.store((iters_ptr + r0) + lr, iters, mask=row_ok)
