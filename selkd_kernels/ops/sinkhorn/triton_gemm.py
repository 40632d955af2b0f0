r"""Scaling-domain Sinkhorn for class counts whose ``K`` does not fit on chip (e.g. 1000 x 1000):
one launch per half-iteration, each a batched matrix product over a grid of (row block, output
tile) with the division fused into its epilogue (docs/gpu.md).

The iteration and the reported quantities are those of :mod:`.triton_scaling` (the reference's
``solve_standard``); ``K`` and ``K^T`` come from its :func:`~.triton_scaling.kernel_matrix_kernel`.
A half-iteration, say the alpha-update, is for the rows ``R`` of a block and the columns ``J``
of a tile::

    S[R, J] = V[R, :] @ K^T[:, J],    U[R, J] = A[R, J] / S[R, J]

so every program reads one column tile of ``K^T`` once for its ``BB`` rows: ``K`` is read once
per half-iteration for each block of rows, not once per row. The scalings ``U``, ``V`` are kept
in scratch next to the denominators ``S``, ``C`` (the state the potentials are taken from), so
the next product loads its operand directly.

Stopping without a host synchronisation. Which iterations are checked is fixed by ``n_iters``
and ``check_every``, so the host launches a fixed sequence (it can be captured in a CUDA graph).
After a checked iteration :func:`check_partial_kernel` computes ``K v`` for the active rows and
the tile sums of ``|u (K v) - a|``; the next alpha-update (``CHECK``) adds them up, freezes rows
at or below ``tol`` and writes the flags (every program of a row block derives the same flags,
so the concurrent writes agree). A frozen row's state is never stored again (masked stores, no
read-modify-write), and a program whose rows are all frozen returns at once.

:func:`rows_prepare_kernel` forms the marginals (or the KD softmaxes) and the starting
``v = 1``; :func:`finish_product_kernel` and :func:`finish_rows_kernel` write the potentials,
loss, error, iteration counts and envelope gradients.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import domain_ok
from .triton_rows import finish_rows, prepare_side, rows_tile, store_rows_tile
from .triton_scaling import half_update, product, tile_error

DO_NOT_SPECIALIZE = ("sa0", "sa1", "sb0", "sb1", "B", "m", "n", "n_tiles", "kdim", "CHECK")


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def rows_prepare_kernel(a_ptr, sa0, sa1, b_ptr, sb0, sb1, pa_ptr, pb_ptr, u_ptr, v_ptr,
                        active_ptr, bad_ptr, iters_ptr, B, m, n, zscale_arg: tl.float64,
                        lo_ptr, hi_ptr, eps_arg: tl.float64, max_range: tl.float64,
                        LDM: tl.constexpr, LDN: tl.constexpr, BB: tl.constexpr,
                        BT: tl.constexpr, KD: tl.constexpr, DOMAIN: tl.constexpr):
    """Marginals, starting scalings (``u`` is filled too so that its padding is defined), active
    flags and per-row bad-input counts of one row block."""
    CD: tl.constexpr = pa_ptr.dtype.element_ty
    run, _ = domain_ok(lo_ptr, hi_ptr, eps_arg, max_range, DOMAIN)
    if run:
        r0 = tl.program_id(0).to(tl.int64) * BB
        lr = tl.arange(0, BB)
        row_ok = r0 + lr < B
        zscale = tl.cast(zscale_arg, CD)
        bad = prepare_side(a_ptr, sa0, sa1, pa_ptr, u_ptr, LDM, r0, lr, row_ok, m, zscale, BB,
                            BT, KD, CD)
        bad += prepare_side(b_ptr, sb0, sb1, pb_ptr, v_ptr, LDN, r0, lr, row_ok, n, zscale, BB,
                             BT, KD, CD)
        tl.store((bad_ptr + r0) + lr, bad)
        tl.store((active_ptr + r0) + lr, row_ok.to(tl.int32))
        tl.store((iters_ptr + r0) + lr, tl.zeros([BB], tl.int32))


@triton.jit
def _block_active(active_ptr, r0, lr, part_ptr, n_tiles, tol, CHECK, BB: tl.constexpr,
                  CD: tl.constexpr):
    """The block's active flags; with CHECK, rows whose summed tile errors are at or below
    ``tol`` are frozen first (and the flags written back)."""
    active = tl.load((active_ptr + r0) + lr) != 0
    if CHECK:
        err = tl.zeros([BB], CD)
        for j in range(n_tiles):
            err += tl.load((part_ptr + r0 * n_tiles) + (lr * n_tiles + j))
        active = active & ~(err <= tol)
        tl.store((active_ptr + r0) + lr, active.to(tl.int32))
    return active


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def scaling_half_kernel(x_ptr, kh_ptr, kl_ptr, p_ptr, den_ptr, y_ptr, active_ptr, part_ptr,
                        iters_ptr, n_tiles, CHECK, lo_ptr, hi_ptr, eps_arg: tl.float64,
                        tol_arg: tl.float64, max_range: tl.float64,
                        LDX: tl.constexpr, LDY: tl.constexpr, LDK: tl.constexpr,
                        BB: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                        TRANS: tl.constexpr, COUNT: tl.constexpr, DOMAIN: tl.constexpr,
                        PRECISION: tl.constexpr):
    """One half-iteration for the rows of block ``pid0`` and output tile ``pid1``: ``den = X @
    Kmat`` on the tile, ``y = p / den`` (0 where ``p == 0``), both stored for active rows only.
    Alpha-update: ``X = V``, ``Kmat = K^T`` (TRANS), ``p = a``, ``den = S``, ``y = U``;
    beta-update the other way round, with ``COUNT`` (iteration counts, added once per row by
    tile 0). ``kh``, ``kl``: TF32 head and tail of ``K`` (rows of length LDK; see
    :mod:`.triton_scaling`, Precision)."""
    CD: tl.constexpr = p_ptr.dtype.element_ty
    run, _ = domain_ok(lo_ptr, hi_ptr, eps_arg, max_range, DOMAIN)
    if run:
        r0 = tl.program_id(0).to(tl.int64) * BB
        lr = tl.arange(0, BB)
        active = _block_active(active_ptr, r0, lr, part_ptr, n_tiles, tl.cast(tol_arg, CD),
                               CHECK, BB, CD)
        if tl.max(active.to(tl.int32), 0) > 0:
            cols = tl.program_id(1) * BT + tl.arange(0, BT)
            P = product(x_ptr, LDX, kh_ptr, kl_ptr, LDK, r0, lr, cols, BB, BT, BK, LDX, TRANS,
                        PRECISION, CD)
            half_update(P, p_ptr, den_ptr, y_ptr, r0, lr, cols, active, LDY)
            if COUNT:
                if tl.program_id(1) == 0:
                    tl.store((iters_ptr + r0) + lr, tl.load((iters_ptr + r0) + lr)
                             + active.to(tl.int32))


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def check_partial_kernel(v_ptr, kh_ptr, kl_ptr, pa_ptr, u_ptr, active_ptr, part_ptr, n_tiles,
                         lo_ptr, hi_ptr, eps_arg: tl.float64, max_range: tl.float64,
                         LDN: tl.constexpr, LDM: tl.constexpr, BB: tl.constexpr,
                         BT: tl.constexpr, BK: tl.constexpr, DOMAIN: tl.constexpr,
                         PRECISION: tl.constexpr):
    """After a checked iteration: ``r = u * (K v)`` on one tile and the tile sums of
    ``|r - a|`` per row into ``part`` (read by the next alpha-update)."""
    CD: tl.constexpr = pa_ptr.dtype.element_ty
    run, _ = domain_ok(lo_ptr, hi_ptr, eps_arg, max_range, DOMAIN)
    if run:
        r0 = tl.program_id(0).to(tl.int64) * BB
        lr = tl.arange(0, BB)
        active = tl.load((active_ptr + r0) + lr) != 0
        if tl.max(active.to(tl.int32), 0) > 0:
            cols = tl.program_id(1) * BT + tl.arange(0, BT)
            P = product(v_ptr, LDN, kh_ptr, kl_ptr, LDN, r0, lr, cols, BB, BT, BK, LDN, True,
                        PRECISION, CD)
            err = tile_error(P, pa_ptr, u_ptr, r0, lr, cols, LDM)
            tl.store((part_ptr + r0 * n_tiles) + (lr * n_tiles + tl.program_id(1)), err)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def finish_product_kernel(v_ptr, kh_ptr, kl_ptr, u_ptr, r_ptr, lo_ptr, hi_ptr,
                          eps_arg: tl.float64,
                          max_range: tl.float64, LDN: tl.constexpr, LDM: tl.constexpr,
                          BB: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                          DOMAIN: tl.constexpr, PRECISION: tl.constexpr):
    """Row sums of the final plan, ``r = u * (K v)``, on one tile."""
    CD: tl.constexpr = u_ptr.dtype.element_ty
    run, _ = domain_ok(lo_ptr, hi_ptr, eps_arg, max_range, DOMAIN)
    if run:
        r0 = tl.program_id(0).to(tl.int64) * BB
        lr = tl.arange(0, BB)
        cols = tl.program_id(1) * BT + tl.arange(0, BT)
        P = product(v_ptr, LDN, kh_ptr, kl_ptr, LDN, r0, lr, cols, BB, BT, BK, LDN, True,
                    PRECISION, CD)
        store_rows_tile(r_ptr, r0, lr, cols, LDM, rows_tile(u_ptr, r0, lr, cols, LDM) * P,
                        lr >= 0)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def finish_rows_kernel(pa_ptr, pb_ptr, s_ptr, c_ptr, r_ptr, bad_ptr, iters_src_ptr, lo_ptr,
                       hi_ptr, alpha_ptr, beta_ptr, loss_ptr, iters_ptr, err_ptr, gt_ptr, gs_ptr,
                       B, m, n, eps_arg: tl.float64, unit_arg: tl.float64,
                       inv_tau_arg: tl.float64, max_range: tl.float64,
                       LDM: tl.constexpr, LDN: tl.constexpr, BB: tl.constexpr,
                       BT: tl.constexpr, KD: tl.constexpr, TEACHER_GRAD: tl.constexpr,
                       DOMAIN: tl.constexpr):
    """Potentials, loss, error, iteration counts and (KD) envelope gradients of one row block
    (:func:`.triton_rows.finish_rows`)."""
    CD: tl.constexpr = pa_ptr.dtype.element_ty
    run, bad_cost = domain_ok(lo_ptr, hi_ptr, eps_arg, max_range, DOMAIN)
    if run:
        r0 = tl.program_id(0).to(tl.int64) * BB
        lr = tl.arange(0, BB)
        row_ok = r0 + lr < B
        bad = (tl.load((bad_ptr + r0) + lr) + bad_cost.to(tl.int32)) > 0
        finish_rows(pa_ptr, pb_ptr, s_ptr, c_ptr, r_ptr, LDM, LDN, r0, lr, row_ok, m, n, bad,
                    tl.load((iters_src_ptr + r0) + lr), tl.load(lo_ptr).to(CD),
                    tl.cast(eps_arg, CD), tl.cast(unit_arg, CD), tl.cast(inv_tau_arg, CD),
                    alpha_ptr, beta_ptr, loss_ptr, iters_ptr, err_ptr, gt_ptr, gs_ptr, BB, BT, KD,
                    TEACHER_GRAD, CD)
