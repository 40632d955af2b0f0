r"""Triton backend for the open-set coupling of Selective KD (paper 2, Eq. 12-14, Alg. 1;
docs/ops/partial_ot.md, docs/backends.md).

The batch is split over many programs; only the 1-D map from the row log-masses ``l`` to the
coupling's row log-masses ``rho`` (see :mod:`selkd_kernels.ops.partial_ot.reference`) runs in a
single program, streaming over the rows in blocks, so no batch size is too large and no tile grows
with it. One call launches, in order (all on the same stream, no host synchronisation):

1. ``row_log_mass`` (grid over row blocks, loop over column chunks): ``l_i = logsumexp_j(Z_ij /
   eps)``; NaN for a row holding NaN or ``+inf``, ``-inf`` for a row of ``-inf`` scores.
2. The solve, exact method: ``exact_candidates`` (grid over row blocks, each looping over all rows
   in blocks) counts each row's rank in decreasing ``l`` (ties broken by index, as a stable sort)
   and the relative tail sum ``sum_{rank_j >= rank_i} exp(l_j - l_i)``; a row whose rank ``c``
   passes ``gamma - c <= tail`` is a candidate. ``exact_finalize`` (one program) takes the smallest
   candidate (else the fallback ``max(ceil(gamma) - 1, 0)``), the log-sum of the unsaturated rows
   relative to their largest, and writes ``rho`` and the saturated mask. The work is O(m^2) in
   parallel tiles of 64 x 64 (the canonical open-set batch, m = 256, is 16 tiles) and O(m) memory.
   Alg. 1: ``bregman`` (one program) runs the ``n_iters`` rounds over ``l`` in blocks and stores
   every round's input (``(n_iters + 1) x m``), the trajectory its backward walks back through.
3. ``log_p`` (grid over row and column blocks): ``log P_ij = (Z_ij / eps - l_i) + rho_i``.

The fused loss (both formulations of docs/selective_kd.md) runs 1-2 for the student and the
teacher, then ``loss_rows`` (grid over row blocks: each row's loss, ``g_i = sum_j dL/dlog P_ij``
and the direct ``h_i = dL/drho_i`` of the consistent formulation), ``vjp`` (one program: the total
loss and ``J^T (g + h)``, the exact closed form or the walk back through the stored Alg. 1 rounds)
and ``loss_grad`` (grid over row and column blocks: ``(G + softmax(Z/eps) (J^T(g+h) - g)) / eps``).

Scalars reach the kernels as small device tensors in the compute dtype (Triton types Python floats
as float32, which float64 runs cannot use): ``gamma`` is already one, the others (``1/eps``,
``lam``, the "not selected" floor) come from a small cache, so a training loop with fixed
arguments makes no host-to-device copy per call. Batch size, class count, strides and
``n_iters`` are not specialised on (``do_not_specialize``), so each kernel compiles once per dtype
and block configuration. :func:`compile_targets` lists the configurations a call launches, for
offline compilation (``benchmarks/triton_report.py``).

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` set before this module is
imported (the test suite's mode).
"""
from __future__ import annotations

import functools

import torch

try:
    import triton
    import triton.language as tl
except Exception as exc:  # Triton is optional: the registry reports this backend as unavailable
    raise ImportError(f"selkd_kernels.ops.partial_ot.triton needs Triton: {exc}") from exc

from ... import _validation as V
from ..triton_device import interpreting, quiet, triton_supports
from . import reference as _ref
from .reference import FORMULATION_CODE, METHOD_CODE


# triton.jit reads the flag when a kernel is defined, so CPU tensors work only if it was set then
_DEFINED_INTERPRETED = interpreting()

# Sentinel rank of rows that are not candidates (larger than any batch).
_BIG = tl.constexpr(2147483647)
# Tile sizes: row blocks of the parallel kernels (float32, float64: the fused-loss row kernel
# holds about a dozen row vectors and two tiles, and spills at 32 float64 rows on sm_90), column
# chunks, and the block the single-program solve streams the rows in.
ROW_BLOCK = {torch.float32: 32, torch.float64: 16}
COL_BLOCK = 32
SOLVE_BLOCK = 1024
NUM_WARPS = 4
_NO_SPECIALIZE = ["m", "k", "n_iters", "stride_m", "stride_k", "s_sm", "s_sk", "t_sm", "t_sk"]


def _jit(fn):
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(do_not_specialize=[n for n in _NO_SPECIALIZE if n in names])(fn)


@triton.jit
def _is_finite(x):
    return (x - x) == 0.0


@triton.jit
def _effective_gamma(g, count):
    # reference.effective_gamma: min(gamma, #finite rows), NaN when none is finite or gamma <= 0
    return tl.where((g > 0) & (count > 0), tl.minimum(g, count), float("nan"))


@triton.jit
def _expm1(x):
    # Kahan's expm1 from exp and log (Triton has no expm1): accurate to a few ulps, also near 0
    u = tl.exp(x)
    um1 = u - 1.0
    safe = tl.where((u == 1.0) | (um1 == -1.0), 1.0, u)
    r = um1 * x / tl.log(safe)
    return tl.where(u == 1.0, x, tl.where(um1 == -1.0, -1.0, r))


@triton.jit
def _merge_lse(mx, ssum, x):
    # elementwise online logsumexp: fold x into the running (max, sum of exp(. - max))
    new = tl.maximum(mx, x)
    shift = tl.where(new == float("-inf"), 0.0, new)
    return new, ssum * tl.exp(mx - shift) + tl.exp(x - shift)


@triton.jit
def _finish_lse(mx, ssum):
    top = tl.max(mx, axis=0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(ssum * tl.exp(mx - shift), axis=0)
    return top, tl.log(total) + shift


@_jit
def _row_log_mass_kernel(z_ptr, stride_m, stride_k, l_ptr, mx_ptr, lrel_ptr, par_ptr, m, k,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    inv_eps = tl.load(par_ptr)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < m
    mx = tl.full([BLOCK_M], float("-inf"), inv_eps.dtype)
    ssum = tl.zeros([BLOCK_M], inv_eps.dtype)
    bad = tl.zeros([BLOCK_M], tl.int32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (offs_k[None, :] < k)
        z = tl.load(z_ptr + offs_m[:, None] * stride_m + offs_k[None, :] * stride_k, mask=mask,
                    other=float("-inf"))
        x = z.to(inv_eps.dtype) * inv_eps
        bad = tl.maximum(bad, tl.max(tl.where((x != x) | (x == float("inf")), 1, 0), axis=1))
        new = tl.maximum(mx, tl.max(x, axis=1))
        shift = tl.where(new == float("-inf"), 0.0, new)
        ssum = ssum * tl.exp(mx - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        mx = new
    lrel = tl.where(mx == float("-inf"), 0.0, tl.log(ssum))
    l = tl.where(mx == float("-inf"), float("-inf"), mx + lrel)
    l = tl.where(bad != 0, float("nan"), l)
    tl.store(l_ptr + offs_m, l, mask=row_ok)
    # l = mx + lrel; log-softmax entries are formed as (x - mx) - lrel (see _log_softmax)
    tl.store(mx_ptr + offs_m, tl.where(mx == float("-inf"), 0.0, mx), mask=row_ok)
    tl.store(lrel_ptr + offs_m, lrel, mask=row_ok)


@triton.jit
def _log_softmax(x, l, mx, lrel):
    # (x - max) - log sum exp(x - max): does not round at the scale of |Z / eps| as x - l does;
    # -inf throughout a row of -inf scores, NaN in a NaN row
    rel = (x - mx[:, None]) - lrel[:, None]
    rel = tl.where((l == float("-inf"))[:, None], float("-inf"), rel)
    return tl.where((l != l)[:, None], float("nan"), rel)


@_jit
def _exact_candidates_kernel(l_ptr, gamma_ptr, rank_ptr, cand_ptr, m,
                             BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
    offs_i = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok_i = offs_i < m
    li = tl.load(l_ptr + offs_i, mask=ok_i, other=float("nan"))
    fin_i = ok_i & _is_finite(li)
    li = tl.where(fin_i, li, 0.0)
    rank = tl.zeros([BLOCK_I], tl.int32)
    tail = tl.zeros([BLOCK_I], li.dtype)
    n_fin = tl.zeros([BLOCK_J], tl.int32)
    for j0 in range(0, m, BLOCK_J):
        offs_j = j0 + tl.arange(0, BLOCK_J)
        ok_j = offs_j < m
        lj = tl.load(l_ptr + offs_j, mask=ok_j, other=float("nan"))
        fin_j = ok_j & _is_finite(lj)
        n_fin += fin_j.to(tl.int32)
        lj2 = tl.where(fin_j, lj, 0.0)[None, :]
        li2 = li[:, None]
        earlier = offs_j[None, :] < offs_i[:, None]
        before = fin_j[None, :] & ((lj2 > li2) | ((lj2 == li2) & earlier))
        after = fin_j[None, :] & (before == 0)
        rank += tl.sum(before.to(tl.int32), axis=1)
        tail += tl.sum(tl.exp(tl.where(after, lj2 - li2, float("-inf"))), axis=1)
    count = tl.sum(n_fin, axis=0).to(li.dtype)
    g = tl.load(gamma_ptr)
    g_eff = _effective_gamma(g, count)
    rem = g_eff - rank.to(li.dtype)
    good = fin_i & (rem > 0) & (rem <= tail)
    tl.store(rank_ptr + offs_i, tl.where(fin_i, rank, _BIG), mask=ok_i)
    tl.store(cand_ptr + offs_i, tl.where(good, rank, _BIG), mask=ok_i)


@_jit
def _exact_finalize_kernel(l_ptr, rank_ptr, cand_ptr, gamma_ptr, rho_ptr, sat_ptr, info_ptr, m,
                           BLOCK: tl.constexpr):
    g = tl.load(gamma_ptr)
    kmin = tl.full([BLOCK], _BIG, tl.int32)
    n_fin = tl.zeros([BLOCK], tl.int32)
    for i0 in range(0, m, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        ok = offs < m
        kmin = tl.minimum(kmin, tl.load(cand_ptr + offs, mask=ok, other=_BIG))
        n_fin += (ok & _is_finite(tl.load(l_ptr + offs, mask=ok, other=float("nan")))).to(tl.int32)
    count = tl.sum(n_fin, axis=0).to(g.dtype)
    g_eff = _effective_gamma(g, count)
    k_first = tl.min(kmin, axis=0)
    # the one fallback formula of reference.fallback_saturated
    fallback = tl.maximum(tl.ceil(g_eff) - 1.0, 0.0)
    k_sat = tl.where(k_first == _BIG, fallback, k_first.to(g.dtype))
    mx = tl.full([BLOCK], float("-inf"), g.dtype)
    ssum = tl.zeros([BLOCK], g.dtype)
    for i0 in range(0, m, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        ok = offs < m
        l = tl.load(l_ptr + offs, mask=ok, other=float("nan"))
        r = tl.load(rank_ptr + offs, mask=ok, other=_BIG).to(g.dtype)
        unsat = ok & _is_finite(l) & (r >= k_sat)
        mx, ssum = _merge_lse(mx, ssum, tl.where(unsat, l, float("-inf")))
    mu, lse = _finish_lse(mx, ssum)
    mu = tl.where(mu == float("-inf"), 0.0, mu)
    rel = tl.log(g_eff - k_sat) - (lse - mu)
    for i0 in range(0, m, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        ok = offs < m
        l = tl.load(l_ptr + offs, mask=ok, other=float("nan"))
        r = tl.load(rank_ptr + offs, mask=ok, other=_BIG).to(g.dtype)
        fin = _is_finite(l)
        sat = fin & (r < k_sat)
        rho = tl.where(sat, 0.0, tl.where(fin, (l - mu) + rel, l))
        rho = tl.where(g_eff != g_eff, float("nan"), rho)
        tl.store(rho_ptr + offs, rho, mask=ok)
        tl.store(sat_ptr + offs, sat.to(tl.int8), mask=ok)
    tl.store(info_ptr, g_eff)
    tl.store(info_ptr + 1, k_sat)


@_jit
def _bregman_kernel(l_ptr, gamma_ptr, traj_ptr, rho_ptr, info_ptr, m, n_iters,
                    BLOCK: tl.constexpr):
    g = tl.load(gamma_ptr)
    n_fin = tl.zeros([BLOCK], tl.int32)
    for i0 in range(0, m, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        ok = offs < m
        l = tl.load(l_ptr + offs, mask=ok, other=float("nan"))
        n_fin += (ok & _is_finite(l)).to(tl.int32)
        tl.store(traj_ptr + offs, l, mask=ok)
    count = tl.sum(n_fin, axis=0).to(g.dtype)
    g_eff = _effective_gamma(g, count)
    log_g = tl.log(g_eff)
    tl.debug_barrier()
    for t in range(0, n_iters):
        src = traj_ptr + t * m
        mx = tl.full([BLOCK], float("-inf"), g.dtype)
        ssum = tl.zeros([BLOCK], g.dtype)
        for i0 in range(0, m, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            ok = offs < m
            r = tl.load(src + offs, mask=ok, other=float("nan"))
            fin = ok & _is_finite(tl.load(l_ptr + offs, mask=ok, other=float("nan")))
            mx, ssum = _merge_lse(mx, ssum, tl.where(fin, tl.minimum(r, 0.0), float("-inf")))
        _, lse = _finish_lse(mx, ssum)
        shift = log_g - lse
        for i0 in range(0, m, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            ok = offs < m
            r = tl.load(src + offs, mask=ok, other=float("nan"))
            l = tl.load(l_ptr + offs, mask=ok, other=float("nan"))
            nxt = tl.where(_is_finite(l), tl.minimum(r, 0.0) + shift, l)
            tl.store(src + m + offs, nxt, mask=ok)
        tl.debug_barrier()
    for i0 in range(0, m, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        ok = offs < m
        rho = tl.load(traj_ptr + n_iters * m + offs, mask=ok, other=float("nan"))
        rho = tl.where(g_eff != g_eff, float("nan"), rho)
        tl.store(rho_ptr + offs, rho, mask=ok)
    tl.store(info_ptr, g_eff)
    tl.store(info_ptr + 1, 0.0)


@_jit
def _log_p_kernel(z_ptr, stride_m, stride_k, l_ptr, mx_ptr, lrel_ptr, rho_ptr, logp_ptr, par_ptr,
                  m, k, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    inv_eps = tl.load(par_ptr)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = offs_m < m
    mask = row_ok[:, None] & (offs_k[None, :] < k)
    z = tl.load(z_ptr + offs_m[:, None] * stride_m + offs_k[None, :] * stride_k, mask=mask,
                other=0.0)
    l = tl.load(l_ptr + offs_m, mask=row_ok, other=0.0)
    rel = _log_softmax(z.to(inv_eps.dtype) * inv_eps, l,
                       tl.load(mx_ptr + offs_m, mask=row_ok, other=0.0),
                       tl.load(lrel_ptr + offs_m, mask=row_ok, other=0.0))
    rho = tl.load(rho_ptr + offs_m, mask=row_ok, other=0.0)
    tl.store(logp_ptr + offs_m[:, None] * k + offs_k[None, :], rel + rho[:, None], mask=mask)


@triton.jit
def _row_vectors(ls_ptr, lt_ptr, rs_ptr, rt_ptr, mxs_ptr, lrs_ptr, mxt_ptr, lrt_ptr, y_ptr, offs_m,
                 row_ok):
    ls = tl.load(ls_ptr + offs_m, mask=row_ok, other=0.0)
    lt = tl.load(lt_ptr + offs_m, mask=row_ok, other=0.0)
    rs = tl.load(rs_ptr + offs_m, mask=row_ok, other=0.0)
    rt = tl.load(rt_ptr + offs_m, mask=row_ok, other=0.0)
    mxs = tl.load(mxs_ptr + offs_m, mask=row_ok, other=0.0)
    lrs = tl.load(lrs_ptr + offs_m, mask=row_ok, other=0.0)
    mxt = tl.load(mxt_ptr + offs_m, mask=row_ok, other=0.0)
    lrt = tl.load(lrt_ptr + offs_m, mask=row_ok, other=0.0)
    y = tl.load(y_ptr + offs_m, mask=row_ok, other=-1)
    return ls, lt, rs, rt, mxs, lrs, mxt, lrt, y


@triton.jit
def _student_teacher_tile(zs_ptr, s_sm, s_sk, zt_ptr, t_sm, t_sk, ls, lt, rs, rt, mxs, lrs, mxt,
                          lrt, y, lam, inv_eps, offs_m, offs_k, mask):
    # log-softmax of the student, log P_S and the label + distillation weights W = Y + lam P_T
    # of one tile (W = 0 outside mask)
    zs = tl.load(zs_ptr + offs_m[:, None] * s_sm + offs_k[None, :] * s_sk, mask=mask, other=0.0)
    zt = tl.load(zt_ptr + offs_m[:, None] * t_sm + offs_k[None, :] * t_sk, mask=mask, other=0.0)
    rel_s = _log_softmax(zs.to(inv_eps.dtype) * inv_eps, ls, mxs, lrs)
    p_t = tl.exp(_log_softmax(zt.to(inv_eps.dtype) * inv_eps, lt, mxt, lrt) + rt[:, None])
    w = tl.where(offs_k[None, :] == y[:, None], 1.0, 0.0) + lam * p_t
    return rel_s, rel_s + rs[:, None], tl.where(mask, w, 0.0)


@_jit
def _loss_rows_kernel(zs_ptr, s_sm, s_sk, zt_ptr, t_sm, t_sk, y_ptr, ls_ptr, lt_ptr, rs_ptr, rt_ptr,
                      mxs_ptr, lrs_ptr, mxt_ptr, lrt_ptr, row_loss_ptr, g_ptr, h_ptr, par_ptr, m,
                      k, FORMULATION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):
    inv_eps = tl.load(par_ptr)
    lam = tl.load(par_ptr + 1)
    floor = tl.load(par_ptr + 2)
    inv_m = 1.0 / (m + tl.zeros([], inv_eps.dtype))
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < m
    ls, lt, rs, rt, mxs, lrs, mxt, lrt, y = _row_vectors(
        ls_ptr, lt_ptr, rs_ptr, rt_ptr, mxs_ptr, lrs_ptr, mxt_ptr, lrt_ptr, y_ptr, offs_m, row_ok)
    acc = tl.zeros([BLOCK_M], inv_eps.dtype)
    gsum = tl.zeros([BLOCK_M], inv_eps.dtype)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (offs_k[None, :] < k)
        _, log_ps, w = _student_teacher_tile(zs_ptr, s_sm, s_sk, zt_ptr, t_sm, t_sk, ls, lt, rs,
                                             rt, mxs, lrs, mxt, lrt, y, lam, inv_eps, offs_m,
                                             offs_k, mask)
        # 0 * log(0) from an underflowed teacher entry contributes nothing
        acc += tl.sum(tl.where(w != 0.0, w * log_ps, 0.0), axis=1)
        gsum += tl.sum(-w * inv_m, axis=1)
    h = tl.zeros([BLOCK_M], inv_eps.dtype)
    if FORMULATION == 1:
        # leftover row mass = "not selected": log(max(1 - exp(rho), floor)), NaN stays NaN
        w0 = tl.where(y == k, 1.0, 0.0) + lam * tl.maximum(-_expm1(rt), 0.0)
        q = -_expm1(rs)
        free = q > floor
        lq = tl.where(q != q, q, tl.log(tl.where(free, q, floor)))
        acc += w0 * lq
        d_nu = -1.0 / _expm1(tl.where(free, -rs, 1.0))
        h = tl.where(free, -(w0 * inv_m) * d_nu, tl.where(q != q, q, 0.0))
    tl.store(row_loss_ptr + offs_m, -acc, mask=row_ok)
    tl.store(g_ptr + offs_m, gsum, mask=row_ok)
    tl.store(h_ptr + offs_m, h, mask=row_ok)


@_jit
def _vjp_kernel(l_ptr, rho_ptr, sat_ptr, info_ptr, traj_ptr, g_ptr, h_ptr, jt_ptr, row_loss_ptr,
                loss_ptr, m, n_iters, METHOD: tl.constexpr, BLOCK: tl.constexpr):
    g_eff = tl.load(info_ptr)
    total = tl.zeros([BLOCK], g_eff.dtype)
    for i0 in range(0, m, BLOCK):
        offs = i0 + tl.arange(0, BLOCK)
        ok = offs < m
        total += tl.load(row_loss_ptr + offs, mask=ok, other=0.0)
        gt = tl.load(g_ptr + offs, mask=ok, other=0.0) + tl.load(h_ptr + offs, mask=ok, other=0.0)
        tl.store(jt_ptr + offs, gt, mask=ok)
    tl.store(loss_ptr, tl.sum(total, axis=0) / (m + tl.zeros([], g_eff.dtype)))
    tl.debug_barrier()
    if METHOD == 0:
        k_sat = tl.load(info_ptr + 1)
        acc = tl.zeros([BLOCK], g_eff.dtype)
        for i0 in range(0, m, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            ok = offs < m
            rho = tl.load(rho_ptr + offs, mask=ok, other=float("nan"))
            unsat = ok & _is_finite(rho) & (tl.load(sat_ptr + offs, mask=ok, other=1) == 0)
            acc += tl.where(unsat, tl.load(jt_ptr + offs, mask=ok, other=0.0), 0.0)
        g_u = tl.sum(acc, axis=0)
        for i0 in range(0, m, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            ok = offs < m
            rho = tl.load(rho_ptr + offs, mask=ok, other=float("nan"))
            unsat = ok & _is_finite(rho) & (tl.load(sat_ptr + offs, mask=ok, other=1) == 0)
            gt = tl.load(jt_ptr + offs, mask=ok, other=0.0)
            mass = tl.exp(tl.where(unsat, rho, 0.0))
            tl.store(jt_ptr + offs, tl.where(unsat, gt - g_u * mass / (g_eff - k_sat), 0.0),
                     mask=ok)
    else:
        # Alg. 1 backward: walk back through the stored round inputs
        for t0 in range(0, n_iters):
            src = traj_ptr + (n_iters - 1 - t0) * m
            mx = tl.full([BLOCK], float("-inf"), g_eff.dtype)
            ssum = tl.zeros([BLOCK], g_eff.dtype)
            acc = tl.zeros([BLOCK], g_eff.dtype)
            for i0 in range(0, m, BLOCK):
                offs = i0 + tl.arange(0, BLOCK)
                ok = offs < m
                fin = ok & _is_finite(tl.load(l_ptr + offs, mask=ok, other=float("nan")))
                r = tl.load(src + offs, mask=ok, other=float("nan"))
                mx, ssum = _merge_lse(mx, ssum, tl.where(fin, tl.minimum(r, 0.0), float("-inf")))
                acc += tl.where(fin, tl.load(jt_ptr + offs, mask=ok, other=0.0), 0.0)
            _, lse = _finish_lse(mx, ssum)
            gs = tl.sum(acc, axis=0)
            tl.debug_barrier()
            for i0 in range(0, m, BLOCK):
                offs = i0 + tl.arange(0, BLOCK)
                ok = offs < m
                fin = ok & _is_finite(tl.load(l_ptr + offs, mask=ok, other=float("nan")))
                r = tl.load(src + offs, mask=ok, other=float("nan"))
                gt = tl.load(jt_ptr + offs, mask=ok, other=0.0)
                q = tl.exp(tl.minimum(r, 0.0) - lse)
                tl.store(jt_ptr + offs, tl.where(fin & (r <= 0.0), gt - q * gs, 0.0), mask=ok)
            tl.debug_barrier()


@_jit
def _loss_grad_kernel(zs_ptr, s_sm, s_sk, zt_ptr, t_sm, t_sk, y_ptr, ls_ptr, lt_ptr, rs_ptr,
                      rt_ptr, mxs_ptr, lrs_ptr, mxt_ptr, lrt_ptr, g_ptr, jt_ptr, grad_ptr, par_ptr,
                      m, k, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    inv_eps = tl.load(par_ptr)
    lam = tl.load(par_ptr + 1)
    inv_m = 1.0 / (m + tl.zeros([], inv_eps.dtype))
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    row_ok = offs_m < m
    mask = row_ok[:, None] & (offs_k[None, :] < k)
    ls, lt, rs, rt, mxs, lrs, mxt, lrt, y = _row_vectors(
        ls_ptr, lt_ptr, rs_ptr, rt_ptr, mxs_ptr, lrs_ptr, mxt_ptr, lrt_ptr, y_ptr, offs_m, row_ok)
    rel_s, _, w = _student_teacher_tile(zs_ptr, s_sm, s_sk, zt_ptr, t_sm, t_sk, ls, lt, rs, rt,
                                        mxs, lrs, mxt, lrt, y, lam, inv_eps, offs_m, offs_k, mask)
    c = tl.load(jt_ptr + offs_m, mask=row_ok, other=0.0) - tl.load(g_ptr + offs_m, mask=row_ok,
                                                                     other=0.0)
    soft = tl.exp(rel_s)
    grad = (-w * inv_m + soft * c[:, None]) * inv_eps
    tl.store(grad_ptr + offs_m[:, None] * k + offs_k[None, :], grad, mask=mask)


# ---- launch configuration (shared by the launches and compile_targets) --------------------------

def _pow2_block(n: int, cap: int, lo: int = 16) -> int:
    return max(lo, min(cap, triton.next_power_of_2(max(int(n), 1))))


def _blocks(m: int, k: int, dtype: torch.dtype) -> dict:
    """Block sizes a call on an (m, k) problem in compute dtype ``dtype`` launches with."""
    return dict(rows=_pow2_block(m, ROW_BLOCK[dtype]), cols=_pow2_block(k, COL_BLOCK),
                solve=_pow2_block(m, SOLVE_BLOCK))


def _num_warps() -> int:
    return 1 if interpreting() else NUM_WARPS


@functools.lru_cache(maxsize=64)
def _params(inv_eps: float, lam: float, floor: float, dtype: torch.dtype, device: torch.device):
    # cached per argument set: a training loop with fixed eps and lam copies them to the device once
    return torch.tensor([inv_eps, lam, floor], dtype=dtype, device=device)


class _Solve:
    """Device buffers of one solve: l, rho, the saturated mask, (gamma_eff, k) and, for Alg. 1,
    the trajectory of round inputs."""

    def __init__(self, z, par, gamma, method, n_iters, blocks, warps):
        m, k = z.shape
        dev, cd = z.device, par.dtype
        self.l = torch.empty(m, dtype=cd, device=dev)
        self.mx = torch.empty(m, dtype=cd, device=dev)
        self.lrel = torch.empty(m, dtype=cd, device=dev)
        self.rho = torch.empty(m, dtype=cd, device=dev)
        self.sat = torch.zeros(m, dtype=torch.int8, device=dev)
        self.info = torch.empty(2, dtype=cd, device=dev)
        self.traj = torch.empty(((n_iters + 1) * m) if method == "bregman" else 1, dtype=cd,
                                device=dev)
        br = blocks["rows"]
        _row_log_mass_kernel[(triton.cdiv(m, br),)](
            z, z.stride(0), z.stride(1), self.l, self.mx, self.lrel, par, m, k, BLOCK_M=br,
            BLOCK_K=blocks["cols"], num_warps=warps)
        if method == "exact":
            rank = torch.empty(m, dtype=torch.int32, device=dev)
            cand = torch.empty(m, dtype=torch.int32, device=dev)
            _exact_candidates_kernel[(triton.cdiv(m, br),)](
                self.l, gamma, rank, cand, m, BLOCK_I=br, BLOCK_J=br, num_warps=warps)
            _exact_finalize_kernel[(1,)](
                self.l, rank, cand, gamma, self.rho, self.sat, self.info, m,
                BLOCK=blocks["solve"], num_warps=warps)
        else:
            _bregman_kernel[(1,)](self.l, gamma, self.traj, self.rho, self.info, m, int(n_iters),
                                  BLOCK=blocks["solve"], num_warps=warps)


class PartialOTTritonBackend:
    name = "triton"

    def supports(self, device) -> bool:
        return triton_supports(device, _DEFINED_INTERPRETED)

    def coupling(self, scores, *, gamma, eps, method, n_iters):
        cd = V.compute_dtype(scores)
        z = scores.detach()
        m, k = z.shape
        blocks, warps = _blocks(m, k, cd), _num_warps()
        par = _params(1.0 / eps, 0.0, _ref.NOT_SELECTED_FLOOR, cd, z.device)
        log_p = torch.empty((m, k), dtype=cd, device=z.device)
        with quiet():
            s = _Solve(z, par, gamma, method, n_iters, blocks, warps)
            grid = (triton.cdiv(m, blocks["rows"]), triton.cdiv(k, blocks["cols"]))
            _log_p_kernel[grid](z, z.stride(0), z.stride(1), s.l, s.mx, s.lrel, s.rho, log_p, par,
                                m, k, BLOCK_M=blocks["rows"], BLOCK_K=blocks["cols"],
                                num_warps=warps)
        return log_p, s.l, s.rho, (s.sat.bool() if method == "exact" else None)

    def loss_forward(self, student_scores, teacher_scores, target, *, gamma, eps, lam, method,
                     n_iters, formulation):
        cd = V.compute_dtype(student_scores, teacher_scores)
        zs, zt = student_scores.detach(), teacher_scores.detach()
        m, k = zs.shape
        dev = zs.device
        blocks, warps = _blocks(m, k, cd), _num_warps()
        par = _params(1.0 / eps, float(lam), _ref.NOT_SELECTED_FLOOR, cd, dev)
        y = target.to(device=dev, dtype=torch.int64).contiguous()
        row_loss = torch.empty(m, dtype=cd, device=dev)
        g = torch.empty(m, dtype=cd, device=dev)
        h = torch.empty(m, dtype=cd, device=dev)
        jt = torch.empty(m, dtype=cd, device=dev)
        loss = torch.empty((), dtype=cd, device=dev)
        grad = torch.empty((m, k), dtype=cd, device=dev)
        br, bc = blocks["rows"], blocks["cols"]
        with quiet():
            ss = _Solve(zs, par, gamma, method, n_iters, blocks, warps)
            st = _Solve(zt, par, gamma, method, n_iters, blocks, warps)
            common = (zs, zs.stride(0), zs.stride(1), zt, zt.stride(0), zt.stride(1), y, ss.l,
                      st.l, ss.rho, st.rho, ss.mx, ss.lrel, st.mx, st.lrel)
            _loss_rows_kernel[(triton.cdiv(m, br),)](
                *common, row_loss, g, h, par, m, k, FORMULATION=FORMULATION_CODE[formulation],
                BLOCK_M=br, BLOCK_K=bc, num_warps=warps)
            _vjp_kernel[(1,)](ss.l, ss.rho, ss.sat, ss.info, ss.traj, g, h, jt, row_loss, loss, m,
                              int(n_iters), METHOD=METHOD_CODE[method], BLOCK=blocks["solve"],
                              num_warps=warps)
            _loss_grad_kernel[(triton.cdiv(m, br), triton.cdiv(k, bc))](
                *common, g, jt, grad, par, m, k, BLOCK_M=br, BLOCK_K=bc, num_warps=warps)
        return loss, grad


BACKEND = PartialOTTritonBackend()


# ---- offline compilation -------------------------------------------------------------------------

_PTR = {torch.float32: "*fp32", torch.float64: "*fp64"}


def compile_targets(m: int, k: int, dtype=torch.float32) -> list:
    """Every kernel configuration a coupling or fused-loss call on an (m, k) problem launches.

    Returns a list of ``(name, jit_fn, signature, constexprs, num_warps)``: ``signature`` maps
    each argument name to its Triton type (``"*fp32"``, ``"i32"``, ``"constexpr"`` ...),
    ``constexprs`` the compile-time arguments to their values, ready for
    ``triton.compile(ASTSource(jit_fn, signature, constexprs), target=GPUTarget("cuda", 90, 64),
    options={"num_warps": num_warps})``. ``dtype`` is the compute dtype (float32 or float64).
    Block sizes are those :class:`PartialOTTritonBackend` uses for this shape; the method and
    formulation variants are separate entries (names ``...[exact]``, ``...[consistent]``).
    """
    if dtype not in _PTR:
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    f = _PTR[dtype]
    b = _blocks(m, k, dtype)
    types = {"z_ptr": f, "zs_ptr": f, "zt_ptr": f, "l_ptr": f, "ls_ptr": f, "lt_ptr": f,
             "mx_ptr": f, "lrel_ptr": f, "mxs_ptr": f, "lrs_ptr": f, "mxt_ptr": f, "lrt_ptr": f,
             "rho_ptr": f, "rs_ptr": f, "rt_ptr": f, "logp_ptr": f, "par_ptr": f,
             "gamma_ptr": f, "info_ptr": f, "traj_ptr": f, "row_loss_ptr": f, "g_ptr": f,
             "h_ptr": f, "jt_ptr": f, "loss_ptr": f, "grad_ptr": f, "rank_ptr": "*i32",
             "cand_ptr": "*i32", "sat_ptr": "*i8", "y_ptr": "*i64"}

    def target(name, fn, **constexprs):
        sig = {a: ("constexpr" if a in constexprs else types.get(a, "i32"))
               for a in fn.arg_names}
        return (name, fn, sig, constexprs, NUM_WARPS)

    rows = dict(BLOCK_M=b["rows"], BLOCK_K=b["cols"])
    out = [target("row_log_mass", _row_log_mass_kernel, **rows),
           target("exact_candidates", _exact_candidates_kernel, BLOCK_I=b["rows"],
                  BLOCK_J=b["rows"]),
           target("exact_finalize", _exact_finalize_kernel, BLOCK=b["solve"]),
           target("bregman", _bregman_kernel, BLOCK=b["solve"]),
           target("log_p", _log_p_kernel, **rows)]
    for form, code in FORMULATION_CODE.items():
        out.append(target(f"loss_rows[{form}]", _loss_rows_kernel, FORMULATION=code, **rows))
    for meth, code in METHOD_CODE.items():
        out.append(target(f"vjp[{meth}]", _vjp_kernel, METHOD=code, BLOCK=b["solve"]))
    out.append(target("loss_grad", _loss_grad_kernel, **rows))
    return out
