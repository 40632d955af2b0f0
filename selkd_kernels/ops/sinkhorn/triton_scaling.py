r"""Scaling-domain Sinkhorn on tensor cores for a shared cost: the Triton backend's kernels for
the cases where the reference's ``method="auto"`` picks the standard domain (docs/gpu.md).

Mathematics (paper 1, Eq. 18-20 and Alg. 3; the reference's ``solve_standard``). With the cost
shifted by its minimum, ``K = exp(-(M - min M) / eps)``, and every row of the batch starting
from ``u = v = 1``, one iteration is::

    s = K v,     u = a / s          (alpha-update)
    c = K^T u,   v = b / c          (beta-update)

For a block of ``BB`` rows each half-iteration is one matrix product, ``S = V K^T`` (BB x m) or
``C = U K`` (BB x n), a tiled ``tl.dot`` over the contraction with the division fused into its
epilogue; no exponential or logarithm is evaluated inside the iteration. ``K`` is formed once
per call by :func:`kernel_matrix_kernel`, zero-padded to powers of two (the padding has zero
mass), and both products read that one copy (``K^T`` tiles by a transposed index), so the
row-block programs re-read at most 2 x 64 KB per half-iteration, a working set an SM's L1 can
keep. The
state kept between half-iterations is the denominators ``S``, ``C`` and the scalings
``U = A / S``, ``V = B / C`` (the next product's operand); the potentials at the end are taken
from the denominators exactly as the reference takes them::

    alpha = eps (log a - log s) + min M,    beta = eps (log b - log c)

so a zero mass gives ``-inf`` and a subnormal mass a finite potential, never the logarithm of an
underflowed quotient. Reported quantities are the reference's: ``r = u * (K v)`` after the last
beta-update, ``err = ||r - a||_1`` and the loss ``<alpha, r> + <beta, b> - eps sum(r)`` over
entries of positive mass. With ``tol``, the error after iteration ``t`` is checked when
``t % check_every == 0``, from the ``K v`` the next alpha-update computes anyway, and a row at or
below ``tol`` freezes: its state is never stored again.

Two ways to run it:

* :func:`scaling_resident_kernel` (``pow2(m) * pow2(n) <= 128 * 128``): one launch for the whole
  solve; a program owns ``BB`` rows from the first iteration to the last and stops when all of
  them have (no host synchronisation). Its state lives in per-call scratch that only that
  program touches (L1/L2); ``K`` is re-read from L2 at each half-iteration.
* :mod:`.triton_gemm` (many classes): one launch per half-iteration over a grid of (row block,
  output tile), with the same product and epilogue helpers.

Precision (``PRECISION``). ``"tf32x3"`` (float32): each operand is split into a TF32 head
``hi = rna_tf32(x)`` and a TF32 tail ``lo = rna_tf32(x - hi)`` and a product is the three TF32
tensor-core products ``x_lo w_hi + x_hi w_lo + x_hi w_hi`` accumulated in float32 (the scheme of
Triton's ``input_precision="tf32x3"``; about float32 accuracy, where one plain TF32 product
carries 2^-11 relative rounding per operand; docs/gpu.md). ``K`` is split once per call by
:func:`kernel_matrix_kernel` instead of at every reloaded tile, and since every operand is
exactly representable in TF32 the products are exact, so Triton's interpreter, which multiplies
exactly, reproduces them on CPU. ``"ieee"`` (float64): one float64 product (DMMA on sm_90).

``method="auto"`` without a host synchronisation: every kernel here reads ``min M`` and ``max M``
(device scalars) and applies the reference's rule (``DOMAIN == 1``: run only where it picks the
standard domain); the log-domain kernel launched for the same call runs in the opposite case.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_common import domain_ok
from .triton_rows import finish_rows, prepare_side, rows_tile, store_rows_tile

# ints that change between calls of one training loop: a new value must not recompile
DO_NOT_SPECIALIZE = ("sa0", "sa1", "sb0", "sb1", "sm0", "sm1", "B", "m", "n", "n_iters",
                     "check_every")


@triton.jit
def round_tf32(x):
    """``x`` rounded to the nearest TF32 value (10-bit mantissa), ties away from zero, as PTX's
    ``cvt.rna.tf32.f32`` does: add half an ulp of TF32 to the magnitude bits, clear the 13 low
    bits. Infinities and NaN keep their class."""
    bits = x.to(tl.uint32, bitcast=True)
    return ((bits + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=("sm0", "sm1", "m", "n"))
def kernel_matrix_kernel(m_ptr, sm0, sm1, lo_ptr, hi_ptr, kh_ptr, kl_ptr, m, n,
                         eps_arg: tl.float64, max_range: tl.float64, LDK: tl.constexpr,
                         TM: tl.constexpr, TN: tl.constexpr, DOMAIN: tl.constexpr,
                         PRECISION: tl.constexpr):
    """``K = exp(-(M - min M)/eps)`` into ``kh`` (rows of length LDK), zero beyond ``m x n``;
    one (TM, TN) tile per program. ``"tf32x3"``: ``kh`` gets the TF32 head, ``kl`` the tail."""
    CD: tl.constexpr = kh_ptr.dtype.element_ty
    run, _ = domain_ok(lo_ptr, hi_ptr, eps_arg, max_range, DOMAIN)
    if run:
        eps = tl.cast(eps_arg, CD)
        oi = tl.program_id(0) * TM + tl.arange(0, TM)
        oj = tl.program_id(1) * TN + tl.arange(0, TN)
        mask = (oi < m)[:, None] & (oj < n)[None, :]
        M = tl.load(m_ptr + oi[:, None].to(tl.int64) * sm0 + oj[None, :].to(tl.int64) * sm1,
                    mask=mask, other=0.0).to(CD)
        lo = tl.load(lo_ptr).to(CD)
        K = tl.where(mask, tl.exp(-(M - lo) / eps), 0.0)
        off = oi[:, None] * LDK + oj[None, :]
        if PRECISION == "tf32x3":
            head = round_tf32(K)
            tl.store(kh_ptr + off, head)
            tl.store(kl_ptr + off, round_tf32(K - head))
        else:
            tl.store(kh_ptr + off, K)


@triton.jit
def _product_step(x_ptr, ld_x, kh_ptr, kl_ptr, ld_k, r0, lr, cols, k0, acc, BK: tl.constexpr,
                  TRANS: tl.constexpr, PRECISION: tl.constexpr):
    """``acc + X[:, k0:k0+BK] @ W[k0:k0+BK, cols]`` with ``W = K`` or (TRANS) ``W = K^T``, read
    from the one copy of ``K`` (see the module docstring, Precision)."""
    ks = k0 + tl.arange(0, BK)
    x = tl.load((x_ptr + r0 * ld_x) + (lr[:, None] * ld_x + ks[None, :]))
    if TRANS:
        w_off = cols[None, :] * ld_k + ks[:, None]
    else:
        w_off = ks[:, None] * ld_k + cols[None, :]
    if PRECISION == "tf32x3":
        x_hi = round_tf32(x)
        x_lo = round_tf32(x - x_hi)
        w_hi = tl.load(kh_ptr + w_off)
        # the small terms first, so that they are not lost against the large one
        acc = tl.dot(x_lo, w_hi, acc, input_precision="tf32")
        acc = tl.dot(x_hi, tl.load(kl_ptr + w_off), acc, input_precision="tf32")
        acc = tl.dot(x_hi, w_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(x, tl.load(kh_ptr + w_off), acc, input_precision=PRECISION)
    return acc


@triton.jit
def product(x_ptr, ld_x, kh_ptr, kl_ptr, ld_k, r0, lr, cols, BB: tl.constexpr,
            BT: tl.constexpr, BK: tl.constexpr, KPAD: tl.constexpr, TRANS: tl.constexpr,
            PRECISION: tl.constexpr, CD: tl.constexpr):
    """``X[r0 + lr, :] @ W[:, cols]`` (BB x BT), ``W = K`` or (TRANS) ``K^T``, tiled over the
    contraction in steps of BK up to KPAD. ``ld_k`` is the row length of ``K``."""
    acc = tl.zeros([BB, BT], CD)
    for k0 in range(0, KPAD, BK):
        acc = _product_step(x_ptr, ld_x, kh_ptr, kl_ptr, ld_k, r0, lr, cols, k0, acc, BK, TRANS,
                            PRECISION)
    return acc


@triton.jit
def tile_error(P, pa_ptr, u_ptr, r0, lr, cols, LD: tl.constexpr):
    """Per row, ``sum |u * P - a|`` over the tile's columns, ``P = K v`` on that tile."""
    A = rows_tile(pa_ptr, r0, lr, cols, LD)
    return tl.sum(tl.abs(rows_tile(u_ptr, r0, lr, cols, LD) * P - A), 1)


@triton.jit
def _check(P, pa_ptr, u_ptr, r0, lr, oi, active, tol, BM: tl.constexpr):
    """Freeze the rows whose error after the last iteration, ``||u * (K v) - a||_1`` with this
    ``P = K v``, is at or below ``tol``."""
    err = tile_error(P, pa_ptr, u_ptr, r0, lr, oi, BM)
    # u is overwritten in place below: every old value must be read first
    tl.debug_barrier()
    return active & ~(err <= tol)


@triton.jit
def half_update(P, p_ptr, den_ptr, y_ptr, r0, lr, cols, active, LD: tl.constexpr):
    """Epilogue of a half-iteration: the new denominators ``P`` and scalings ``p / P`` (0 where
    ``p == 0``) of the active rows."""
    p = rows_tile(p_ptr, r0, lr, cols, LD)
    store_rows_tile(den_ptr, r0, lr, cols, LD, P, active)
    store_rows_tile(y_ptr, r0, lr, cols, LD, tl.where(p > 0, p / P, 0.0), active)


@triton.jit
def _final_row_sums(v_ptr, u_ptr, kh_ptr, kl_ptr, r_ptr, r0, lr, BB: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
                    PRECISION: tl.constexpr, CD: tl.constexpr):
    """``r = u * (K v)``, the final plan's row sums, into ``r``, BT columns at a time."""
    every = lr >= 0
    for c0 in range(0, BM, BT):
        cols = c0 + tl.arange(0, BT)
        P = product(v_ptr, BN, kh_ptr, kl_ptr, BN, r0, lr, cols, BB, BT, BK, BN, True,
                    PRECISION, CD)
        store_rows_tile(r_ptr, r0, lr, cols, BM, rows_tile(u_ptr, r0, lr, cols, BM) * P, every)


@triton.jit(do_not_specialize=DO_NOT_SPECIALIZE)
def scaling_resident_kernel(
        a_ptr, sa0, sa1, b_ptr, sb0, sb1, kh_ptr, kl_ptr, lo_ptr, hi_ptr,
        pa_ptr, pb_ptr, s_ptr, c_ptr, u_ptr, v_ptr, r_ptr,
        alpha_ptr, beta_ptr, loss_ptr, iters_ptr, err_ptr, gt_ptr, gs_ptr,
        B, m, n, n_iters, check_every,
        eps_arg: tl.float64, unit_arg: tl.float64, inv_tau_arg: tl.float64,
        zscale_arg: tl.float64, tol_arg: tl.float64, max_range: tl.float64,
        BB: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        BT: tl.constexpr, KD: tl.constexpr, TEACHER_GRAD: tl.constexpr, HAS_TOL: tl.constexpr,
        DOMAIN: tl.constexpr, PRECISION: tl.constexpr):
    """Rows ``[pid * BB, pid * BB + BB)``, the whole solve (module docstring). ``a``/``b``:
    marginals, or logits when ``KD`` (teacher = source ``a``); ``pa``, ``s``, ``u``, ``r`` (BM
    wide) and ``pb``, ``c``, ``v`` (BN wide): scratch of ``cdiv(B, BB) * BB`` rows. BT: the
    column tile of the prologue and epilogue."""
    CD: tl.constexpr = alpha_ptr.dtype.element_ty
    run, bad_cost = domain_ok(lo_ptr, hi_ptr, eps_arg, max_range, DOMAIN)
    if run:
        oi = tl.arange(0, BM)
        oj = tl.arange(0, BN)
        r0 = tl.program_id(0).to(tl.int64) * BB
        lr = tl.arange(0, BB)
        row_ok = r0 + lr < B
        zscale = tl.cast(zscale_arg, CD)
        nbad = prepare_side(a_ptr, sa0, sa1, pa_ptr, u_ptr, BM, r0, lr, row_ok, m, zscale, BB, BT,
                            KD, CD)
        nbad += prepare_side(b_ptr, sb0, sb1, pb_ptr, v_ptr, BN, r0, lr, row_ok, n, zscale, BB,
                             BT, KD, CD)
        tl.debug_barrier()  # the scratch rows are read back by other threads of the program
        tol = tl.cast(tol_arg, CD)
        active = row_ok
        iters = tl.zeros([BB], tl.int32)
        t = 0
        go = n_iters > 0
        while go:
            P = product(v_ptr, BN, kh_ptr, kl_ptr, BN, r0, lr, oi, BB, BM, BK, BN, True,
                        PRECISION, CD)
            if HAS_TOL:
                if (t > 0) & ((t % check_every) == 0):
                    active = _check(P, pa_ptr, u_ptr, r0, lr, oi, active, tol, BM)
            half_update(P, pa_ptr, s_ptr, u_ptr, r0, lr, oi, active, BM)
            tl.debug_barrier()
            P = product(u_ptr, BM, kh_ptr, kl_ptr, BN, r0, lr, oj, BB, BN, BK, BM, False,
                        PRECISION, CD)
            half_update(P, pb_ptr, c_ptr, v_ptr, r0, lr, oj, active, BN)
            tl.debug_barrier()
            iters += active.to(tl.int32)
            t += 1
            go = (t < n_iters) & (tl.max(active.to(tl.int32), 0) > 0)
        _final_row_sums(v_ptr, u_ptr, kh_ptr, kl_ptr, r_ptr, r0, lr, BB, BM, BN, BK, BT,
                        PRECISION, CD)
        tl.debug_barrier()
        finish_rows(pa_ptr, pb_ptr, s_ptr, c_ptr, r_ptr, BM, BN, r0, lr, row_ok, m, n,
                    (nbad + bad_cost.to(tl.int32)) > 0, iters, tl.load(lo_ptr).to(CD),
                    tl.cast(eps_arg, CD), tl.cast(unit_arg, CD), tl.cast(inv_tau_arg, CD),
                    alpha_ptr, beta_ptr, loss_ptr, iters_ptr, err_ptr, gt_ptr, gs_ptr, BB, BT, KD,
                    TEACHER_GRAD, CD)
