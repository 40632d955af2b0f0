r"""Device helpers shared by the Sinkhorn Triton kernels (marginals, input checks, envelope
gradients), and the scalar conventions every kernel follows.

Marginals. A kernel either reads the marginals ``a``, ``b`` as given, or (fused distillation
forward, ``KD``) forms them from logits as the temperature softmax of paper 1, Eq. (10),
``p = softmax(z / tau)``, exactly as the reference does before its solve: subtract the row
maximum, exponentiate, divide by the sum. Padding lanes (beyond the class count, or rows beyond
the batch) carry zero mass, so they drop out of every product and every sum.

Bad inputs. A row whose inputs hold NaN or inf (for logits: NaN, ``+inf``, or a row that is all
``-inf``, whose softmax is NaN) or whose cost holds one, reports a NaN loss and error, as the
reference's ``_poison_bad_rows`` does. ``-inf`` logits are legitimate zero probabilities.

Envelope gradients (paper 1, Prop. 4.2 / Eq. 15): ``dS/dz = (phi - <phi, p>) p / tau`` with
``phi`` the potential where ``p > 0`` and 0 where ``p == 0``.

Scalars. Float scalars are kernel arguments annotated ``tl.float64``: the launcher passes them as
C doubles (no device tensor, so no host-to-device copy per call) and each kernel casts them once
to its compute dtype ``CD``; a float32 kernel therefore sees exactly the float32 rounding of the
value the host computed in double, a float64 kernel the double itself.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def load_marginal_rows(ptr, s0, s1, rows, row_ok, cols, col_ok, zscale, KD: tl.constexpr,
                       CD: tl.constexpr):
    """``(p, bad)`` for a block of rows: ``p`` (R, K) in ``CD`` with zeros in padding lanes,
    ``bad`` (R,) the number of offending inputs per row.

    KD: ``p = softmax(z / tau)`` along the class axis, ``zscale = log2(e) / tau``.
    """
    mask = row_ok[:, None] & col_ok[None, :]
    offs = rows[:, None].to(tl.int64) * s0 + cols[None, :].to(tl.int64) * s1
    if KD:
        z = tl.load(ptr + offs, mask=mask, other=float("-inf")).to(CD)
        x = z * zscale
        top = tl.max(x, 1)
        # an all -inf row keeps top = -inf; shifting by 0 there makes every term 0 and the
        # 0/0 softmax NaN, as torch.softmax gives it
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        e = tl.exp2(x - top_safe[:, None])
        p = e / tl.sum(e, 1)[:, None]
        odd = mask & ((z != z) | (z == float("inf")))
        bad = tl.sum(odd.to(tl.int32), 1) + (row_ok & (top == float("-inf"))).to(tl.int32)
    else:
        p = tl.load(ptr + offs, mask=mask, other=0.0).to(CD)
        odd = mask & ~((p == p) & (tl.abs(p) < float("inf")))
        bad = tl.sum(odd.to(tl.int32), 1)
    return tl.where(mask, p, 0.0), bad


@triton.jit
def load_marginal_vector(ptr, stride, offs, ok, zscale, KD: tl.constexpr, CD: tl.constexpr):
    """One row's marginal as a vector: ``(p, bad)`` with ``bad`` a scalar count (see
    :func:`load_marginal_rows`)."""
    if KD:
        z = tl.load(ptr + offs.to(tl.int64) * stride, mask=ok, other=float("-inf")).to(CD)
        x = z * zscale
        top = tl.max(x, 0)
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        e = tl.exp2(x - top_safe)
        p = e / tl.sum(e, 0)
        odd = ok & ((z != z) | (z == float("inf")))
        bad = tl.sum(odd.to(tl.int32), 0) + (top == float("-inf")).to(tl.int32)
    else:
        p = tl.load(ptr + offs.to(tl.int64) * stride, mask=ok, other=0.0).to(CD)
        odd = ok & ~((p == p) & (tl.abs(p) < float("inf")))
        bad = tl.sum(odd.to(tl.int32), 0)
    return tl.where(ok, p, 0.0), bad


@triton.jit
def count_bad(x, mask):
    """Number of NaN or infinite entries of a 2-D block inside ``mask``."""
    odd = mask & ~((x == x) & (tl.abs(x) < float("inf")))
    return tl.sum(tl.sum(odd.to(tl.int32), 1), 0)


@triton.jit
def envelope_grad_rows(phi, p, inv_tau):
    """``(phi - <phi, p>) p / tau`` along axis 1; ``phi`` is ignored where ``p == 0``."""
    phi = tl.where(p > 0, phi, 0.0)
    mean = tl.sum(phi * p, 1)
    return (phi - mean[:, None]) * p * inv_tau


@triton.jit
def envelope_grad_vector(phi, p, inv_tau):
    """:func:`envelope_grad_rows` for one row held as a vector."""
    phi = tl.where(p > 0, phi, 0.0)
    mean = tl.sum(phi * p, 0)
    return (phi - mean) * p * inv_tau


@triton.jit
def use_standard_domain(lo, hi, eps, max_range):
    """The reference's ``method="auto"`` rule on device: ``(max M - min M) / eps <= max_range``,
    the difference taken in the cost's dtype and the quotient in float64 as the host does (so the
    two kernels that share a call agree on which of them runs). NaN (a non-finite cost) is
    never the standard domain."""
    rng = (hi - lo).to(tl.float64) / eps
    return rng <= max_range
