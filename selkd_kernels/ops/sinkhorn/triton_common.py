r"""Device helpers shared by the Sinkhorn Triton kernels that work one row at a time (marginals,
input checks, envelope gradients, the device-side ``method="auto"`` rule), and the scalar
conventions every kernel follows. The row-block kernels' tiled counterparts are in
:mod:`.triton_rows`.

Marginals. A kernel either reads the marginals ``a``, ``b`` as given, or (fused distillation
forward, ``KD``) forms them from logits as the temperature softmax of paper 1, Eq. (10),
``p = softmax(z / tau)``, exactly as the reference does before its solve: subtract the row
maximum, exponentiate, divide by the sum. Padding lanes (beyond the class count, or rows beyond
the batch) carry zero mass, so they drop out of every product and every sum.

Bad inputs. A row whose inputs hold NaN or inf (for logits: NaN, ``+inf``, or a row that is all
``-inf``, whose softmax is NaN) or whose cost holds one, reports NaN in its loss, error,
potentials and envelope gradients (every entry), as the reference's ``_poison_bad_rows`` does.
``-inf`` logits are legitimate zero probabilities.

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


@triton.jit
def load_marginal_vector(ptr, stride, offs, ok, zscale, KD: tl.constexpr, CD: tl.constexpr):
    """One row's marginal as a vector: ``(p, bad)``, ``p`` in ``CD`` with zeros in padding lanes
    and ``bad`` the number of offending inputs. KD: ``p = softmax(z / tau)``, ``zscale =
    log2(e) / tau``."""
    if KD:
        z = tl.load(ptr + offs.to(tl.int64) * stride, mask=ok, other=float("-inf")).to(CD)
        x = z * zscale
        top = tl.max(x, 0)
        # an all -inf row keeps top = -inf; shifting by 0 there makes every term 0 and the
        # 0/0 softmax NaN, as torch.softmax gives it
        top_safe = tl.where(top == float("-inf"), 0.0, top)
        # exponentials taken 2^64 too large and scaled back by the division: subnormal
        # probabilities survive the flush-to-zero of the fast exp2 (torch.softmax keeps them)
        e = tl.exp2(x - top_safe + 64.0)
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
def envelope_grad_vector(phi, p, inv_tau):
    """``(phi - <phi, p>) p / tau`` for one row held as a vector; ``phi`` is ignored where
    ``p == 0``."""
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


@triton.jit
def domain_ok(lo_ptr, hi_ptr, eps_arg, max_range, DOMAIN: tl.constexpr):
    """Whether this kernel runs for this call: always (0), only where the reference's
    ``method="auto"`` rule picks the standard domain (1) or only where it picks the log domain
    (2). Also returns whether the cost holds NaN or inf (its min or max is not finite)."""
    lo = tl.load(lo_ptr)
    hi = tl.load(hi_ptr)
    bad_cost = ~((lo == lo) & (hi == hi) & (tl.abs(lo) < float("inf"))
                 & (tl.abs(hi) < float("inf")))
    run = True
    if DOMAIN == 1:
        run = use_standard_domain(lo, hi, eps_arg, max_range)
    if DOMAIN == 2:
        run = ~use_standard_domain(lo, hi, eps_arg, max_range)
    return run, bad_cost


@triton.jit
def online_lse(run_max, run_sum, x, AXIS: tl.constexpr):
    """One tile of an online log-sum-exp along AXIS."""
    new_max = tl.maximum(run_max, tl.max(x, AXIS))
    safe = tl.where(new_max == float("-inf"), 0.0, new_max)
    run_sum = run_sum * tl.exp2(run_max - safe) + tl.sum(tl.exp2(x - tl.expand_dims(safe, AXIS)),
                                                         AXIS)
    return new_max, run_sum
