r"""Triton backend for the open-set coupling of Selective KD (paper 2, Eq. 12-14; docs/ops/partial_ot.md, docs/backends.md).

One program handles the whole batch (one launch per batch): the (m, k) score tile, its row
log-masses ``l_i = logsumexp_j(Z_ij/eps)`` and the 1-D map ``l -> rho`` (row log-masses of the
coupling, see :mod:`selkd_kernels.ops.partial_ot.reference`) all stay on chip.

* ``exact``: instead of sorting, each row's rank in decreasing ``l`` is counted by comparing all
  pairs of rows of the block (ties broken by index, as a stable sort would). Candidate ``k = rank_i``
  (saturate the ``k`` largest rows) is consistent when the largest unsaturated row, row ``i``
  itself, is not pushed above mass 1, i.e. ``gamma - rank_i <= sum_{rank_j >= rank_i}
  exp(l_j - l_i)``; the sum is shifted by ``l_i``, the tail's maximum, so it never underflows. The
  smallest consistent rank is the answer. This is O(m^2) work in registers, meant for m up to a
  few hundred (the canonical open-set batch is m = 256, k = 21).
* ``bregman``: paper 2's Alg. 1 as written, ``n_iters`` rounds on the vector ``rho``.

The fused loss kernel computes the teacher and student couplings, the loss
``-(1/m) sum_ij (Y_ij + lam P_T,ij) log P_S,ij`` and its gradient w.r.t. the student scores
(closed form of :func:`selkd_kernels.ops.partial_ot.reference.grad_scores`) in the same program.

Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (the test suite's mode).
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np

import torch
import triton
import triton.language as tl

from ... import _validation as V

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_METHOD_CODE = {"exact": 0, "bregman": 1}
# One program holds an (m, m) comparison tile. 512 rows compile for sm_90 in ~25 s and already
# spill; larger batches go to another backend ("auto") or are refused (explicit "triton").
MAX_ROWS = 512


@triton.jit
def _row_log_mass(z_ptr, stride_m, stride_k, m, k, inv_eps, offs_m, offs_k):
    row_ok = offs_m < m
    mask = row_ok[:, None] & (offs_k[None, :] < k)
    z = tl.load(z_ptr + offs_m[:, None] * stride_m + offs_k[None, :] * stride_k, mask=mask,
                other=0.0)
    x = tl.where(mask, z * inv_eps, float("-inf"))
    mx = tl.max(x, axis=1)
    mx_safe = tl.where(row_ok, mx, 0.0)
    # -inf in a valid row stays -inf only if the whole row is -inf; +inf/NaN propagate as NaN
    ssum = tl.sum(tl.where(mask, tl.exp(x - mx_safe[:, None]), 0.0), axis=1)
    l = mx_safe + tl.log(ssum)
    l = tl.where(row_ok, l, float("-inf"))
    return x, l


@triton.jit
def _solve_rho(l, offs_m, m, gamma, log_gamma, k_fallback, n_iters, METHOD: tl.constexpr):
    row_ok = offs_m < m
    if METHOD == 0:
        li = l[:, None]
        lj = l[None, :]
        ii = offs_m[:, None]
        jj = offs_m[None, :]
        ok_j = row_ok[None, :]
        before = ok_j & ((lj > li) | ((lj == li) & (jj < ii)))
        rank = tl.sum(tl.where(before, 1, 0), axis=1)
        l_shift = tl.where(row_ok, l, 0.0)
        in_tail = ok_j & (rank[None, :] >= rank[:, None])
        tail = tl.sum(tl.where(in_tail, tl.exp(lj - l_shift[:, None]), 0.0), axis=1)
        rem = gamma - rank.to(l.dtype)
        good = row_ok & (rem > 0) & (rem <= tail)
        big = 2147483647
        k_first = tl.min(tl.where(good, rank, big), axis=0)
        k_sat = tl.where(k_first == big, k_fallback, k_first)
        sat = row_ok & (rank < k_sat)
        unsat = row_ok & (rank >= k_sat)
        mu = tl.max(tl.where(unsat, l, float("-inf")), axis=0)
        lse_u = mu + tl.log(tl.sum(tl.where(unsat, tl.exp(l - mu), 0.0), axis=0))
        log_kappa = tl.log(gamma - k_sat.to(l.dtype)) - lse_u
        rho = tl.where(sat, 0.0, l + log_kappa)
        rho = tl.where(row_ok, rho, float("-inf"))
    else:
        rho = l
        sat = offs_m < 0
        for _ in range(n_iters):
            rho = tl.minimum(rho, 0.0)
            mx = tl.max(rho, axis=0)
            lse = mx + tl.log(tl.sum(tl.where(row_ok, tl.exp(rho - mx), 0.0), axis=0))
            rho = rho + (log_gamma - lse)
            rho = tl.where(row_ok, rho, float("-inf"))
    return rho, sat


@triton.jit
def _rho_vjp(g, l, rho, sat, offs_m, m, gamma, log_gamma, n_iters, METHOD: tl.constexpr):
    row_ok = offs_m < m
    if METHOD == 0:
        unsat = row_ok & (sat == 0)
        k_sat = tl.sum(tl.where(sat, 1, 0), axis=0).to(g.dtype)
        g_u = tl.sum(tl.where(unsat, g, 0.0), axis=0)
        mass = tl.where(unsat, tl.exp(rho), 0.0)
        out = tl.where(unsat, g - g_u * mass / (gamma - k_sat), 0.0)
    else:
        # Alg. 1 backward: recompute each round's input from l, then step back through it
        out = g
        for t0 in range(n_iters):
            t = n_iters - 1 - t0
            r = l
            for _ in range(t):
                r = tl.minimum(r, 0.0)
                mx = tl.max(r, axis=0)
                lse = mx + tl.log(tl.sum(tl.where(row_ok, tl.exp(r - mx), 0.0), axis=0))
                r = tl.where(row_ok, r + (log_gamma - lse), float("-inf"))
            a = tl.minimum(r, 0.0)
            mx = tl.max(a, axis=0)
            q = tl.where(row_ok, tl.exp(a - mx), 0.0)
            q = q / tl.sum(q, axis=0)
            gs = tl.sum(tl.where(row_ok, out, 0.0), axis=0)
            out = tl.where(row_ok & (r <= 0), out - q * gs, 0.0)
    return out


@triton.jit
def _coupling_kernel(z_ptr, stride_m, stride_k, logp_ptr, l_ptr, rho_ptr, sat_ptr, par_ptr, m, k,
                     k_fallback, n_iters, METHOD: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    gamma = tl.load(par_ptr)
    log_gamma = tl.load(par_ptr + 1)
    inv_eps = tl.load(par_ptr + 2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    x, l = _row_log_mass(z_ptr, stride_m, stride_k, m, k, inv_eps, offs_m, offs_k)
    rho, sat = _solve_rho(l, offs_m, m, gamma, log_gamma, k_fallback, n_iters, METHOD)
    row_ok = offs_m < m
    mask = row_ok[:, None] & (offs_k[None, :] < k)
    log_p = (x - l[:, None]) + rho[:, None]
    tl.store(logp_ptr + offs_m[:, None] * k + offs_k[None, :], log_p, mask=mask)
    tl.store(l_ptr + offs_m, l, mask=row_ok)
    tl.store(rho_ptr + offs_m, rho, mask=row_ok)
    tl.store(sat_ptr + offs_m, sat.to(tl.int8), mask=row_ok)


@triton.jit
def _loss_kernel(zs_ptr, s_sm, s_sk, zt_ptr, t_sm, t_sk, y_ptr, loss_ptr, grad_ptr, par_ptr, m, k,
                 k_fallback, n_iters, METHOD: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    gamma = tl.load(par_ptr)
    log_gamma = tl.load(par_ptr + 1)
    inv_eps = tl.load(par_ptr + 2)
    eps = tl.load(par_ptr + 3)
    lam = tl.load(par_ptr + 4)
    inv_m = tl.load(par_ptr + 5)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < m
    mask = row_ok[:, None] & (offs_k[None, :] < k)
    xs, ls = _row_log_mass(zs_ptr, s_sm, s_sk, m, k, inv_eps, offs_m, offs_k)
    xt, lt = _row_log_mass(zt_ptr, t_sm, t_sk, m, k, inv_eps, offs_m, offs_k)
    rho_s, sat_s = _solve_rho(ls, offs_m, m, gamma, log_gamma, k_fallback, n_iters, METHOD)
    rho_t, sat_t = _solve_rho(lt, offs_m, m, gamma, log_gamma, k_fallback, n_iters, METHOD)
    ls_safe = tl.where(row_ok, ls, 0.0)
    lt_safe = tl.where(row_ok, lt, 0.0)
    rs_safe = tl.where(row_ok, rho_s, 0.0)
    rt_safe = tl.where(row_ok, rho_t, 0.0)
    log_soft_s = xs - ls_safe[:, None]
    log_ps = log_soft_s + rs_safe[:, None]
    p_t = tl.where(mask, tl.exp((xt - lt_safe[:, None]) + rt_safe[:, None]), 0.0)
    y = tl.load(y_ptr + offs_m, mask=row_ok, other=-1)
    w = tl.where(offs_k[None, :] == y[:, None], 1.0, 0.0) + lam * p_t
    w = tl.where(mask, w, 0.0)
    # 0 * log(0) from an underflowed teacher entry contributes nothing
    contrib = tl.where(w != 0.0, w * log_ps, 0.0)
    loss = -tl.sum(tl.sum(contrib, axis=1), axis=0) * inv_m
    tl.store(loss_ptr, loss)
    G = -w * inv_m
    g = tl.sum(G, axis=1)
    jt_g = _rho_vjp(g, ls, rho_s, sat_s, offs_m, m, gamma, log_gamma, n_iters, METHOD)
    soft = tl.where(mask, tl.exp(log_soft_s), 0.0)
    grad = (G + soft * (jt_g - g)[:, None]) / eps
    tl.store(grad_ptr + offs_m[:, None] * k + offs_k[None, :], grad, mask=mask)


def _launch_params(m: int, k: int):
    if m > MAX_ROWS:
        raise ValueError(f"scores has {m} rows; the Triton partial-OT kernel holds one batch in a "
                         f"single program and supports at most {MAX_ROWS} rows")
    block_m = max(triton.next_power_of_2(m), 16)
    block_k = max(triton.next_power_of_2(k), 16)
    num_warps = 1 if _INTERPRET else (4 if block_m <= 64 else (8 if block_m <= 256 else 16))
    return block_m, block_k, num_warps


def _fallback_k(gamma: float, m: int) -> int:
    n_feasible = int(math.ceil(gamma)) if gamma < m else m
    return max(n_feasible - 1, 0)


def _params(ref, gamma, eps, lam, m):
    # Triton types Python floats as float32; a float64 run needs its scalars in float64 too
    vals = [float(gamma), math.log(gamma), 1.0 / eps, float(eps), float(lam), 1.0 / m]
    return torch.tensor(vals, dtype=ref.dtype, device=ref.device)


def _quiet():
    # the interpreter evaluates masked-off lanes with numpy (log 0, inf - inf); the results are
    # discarded by the masks, so its floating-point warnings are noise
    return np.errstate(all="ignore") if _INTERPRET else contextlib.nullcontext()


class PartialOTTritonBackend:
    name = "triton"
    max_rows = MAX_ROWS

    def supports(self, device: torch.device) -> bool:
        return device.type == "cuda" or (_INTERPRET and device.type == "cpu")

    def coupling(self, scores, *, gamma, eps, method, n_iters):
        cd = V.compute_dtype(scores)
        z = scores.to(cd)
        m, k = z.shape
        block_m, block_k, num_warps = _launch_params(m, k)
        k_fb = _fallback_k(gamma, m)
        log_p = torch.empty((m, k), dtype=cd, device=z.device)
        l = torch.empty(m, dtype=cd, device=z.device)
        rho = torch.empty(m, dtype=cd, device=z.device)
        sat = torch.empty(m, dtype=torch.int8, device=z.device)
        par = _params(z, gamma, eps, 0.0, m)
        with _quiet():
            _coupling_kernel[(1,)](z, z.stride(0), z.stride(1), log_p, l, rho, sat, par, m, k, k_fb,
                                   int(n_iters), METHOD=_METHOD_CODE[method], BLOCK_M=block_m,
                                   BLOCK_K=block_k, num_warps=num_warps)
        return log_p, l, rho, (sat.bool() if method == "exact" else None)

    def loss_forward(self, student_scores, teacher_scores, target, *, gamma, eps, lam, method,
                     n_iters):
        cd = V.compute_dtype(student_scores, teacher_scores)
        zs, zt = student_scores.to(cd), teacher_scores.to(cd)
        m, k = zs.shape
        block_m, block_k, num_warps = _launch_params(m, k)
        k_fb = _fallback_k(gamma, m)
        y = target.to(device=zs.device, dtype=torch.int64).contiguous()
        loss = torch.empty((), dtype=cd, device=zs.device)
        grad = torch.empty((m, k), dtype=cd, device=zs.device)
        par = _params(zs, gamma, eps, lam, m)
        with _quiet():
            _loss_kernel[(1,)](zs, zs.stride(0), zs.stride(1), zt, zt.stride(0), zt.stride(1), y,
                               loss, grad, par, m, k, k_fb, int(n_iters),
                               METHOD=_METHOD_CODE[method], BLOCK_M=block_m, BLOCK_K=block_k,
                               num_warps=num_warps)
        return loss, grad


BACKEND = PartialOTTritonBackend()
