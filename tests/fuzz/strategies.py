"""Problem strategies and tolerances for the fuzz suite.

Hypothesis draws the structure of a case (sizes, dtype, strides, which entries are zero, NaN or
inf, eps, cost scale, iteration options) and integer seeds; the numbers themselves come from
seeded torch generators (drawing arrays element by element would cost most of the budget).
Shrinking still works on the structure, which is what a failure report needs.

The promised range (docs/guarantees.md): costs with ``max |M|`` up to 10, eps in [1e-3, 10],
logits up to 20 in magnitude, tau in [0.5, 10]; marginals with exact zeros, masses down to
float32 subnormals, whole rows without mass, and NaN / inf entries.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from hypothesis import settings
from hypothesis import strategies as st

from tests.fuzz.conftest import PROFILE
from tests.utils import generator, non_contiguous


def budget(examples: int) -> settings:
    """``examples`` cases per test in the ``ci`` profile, ten times as many in ``long``."""
    return settings(max_examples=examples * (10 if PROFILE == "long" else 1))


@dataclass
class OTCase:
    a: torch.Tensor
    b: torch.Tensor
    cost: torch.Tensor
    eps: float
    opts: dict
    bad_rows: list = field(default_factory=list)     # rows holding NaN / inf
    empty_rows: list = field(default_factory=list)   # rows whose a and b are all zero

    def __repr__(self):  # what a failure report prints
        return (f"OTCase(B={self.a.shape[0]}, m={self.a.shape[1]}, n={self.b.shape[1]}, "
                f"dtype={self.a.dtype}, cost={tuple(self.cost.shape)}, max|M|="
                f"{float(self.cost.abs().nan_to_num(0, 0, 0).max()):.3g}, eps={self.eps:.3g}, "
                f"opts={self.opts}, bad={self.bad_rows}, empty={self.empty_rows}, "
                f"contiguous={self.a.is_contiguous() and self.cost.is_contiguous()})")


def _rows(B, k, seed, spread, zero_frac, dtype):
    g = generator(seed)
    p = torch.softmax(spread * torch.randn(B, k, dtype=torch.float64, generator=g), -1)
    if zero_frac > 0 and k > 1:
        drop = torch.rand(B, k, dtype=torch.float64, generator=g) < zero_frac
        drop[:, 0] = False  # every row keeps some mass
        p = torch.where(drop, torch.zeros_like(p), p)
        p = p / p.sum(-1, keepdim=True)
    return p.to(dtype)


@st.composite
def ot_cases(draw, max_b=4, max_k=9, dtypes=(torch.float32, torch.float64), bad=True,
             eps_range=(1e-3, 10.0)):
    """A batched OT problem inside the promised range, with optional NaN / inf rows."""
    B = draw(st.integers(1, max_b))
    m, n = draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2 ** 16))
    spread = draw(st.sampled_from([0.5, 2.0, 20.0]))       # 20: float32-subnormal masses
    zero_frac = draw(st.sampled_from([0.0, 0.0, 0.3]))
    a = _rows(B, m, seed, spread, zero_frac, torch.float64)
    b = _rows(B, n, seed + 1, draw(st.sampled_from([0.5, 2.0])), zero_frac, torch.float64)
    per_row = draw(st.booleans())
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0]))
    shape = (B, m, n) if per_row else (m, n)
    M = scale * torch.rand(*shape, dtype=torch.float64, generator=generator(seed + 2))
    if draw(st.booleans()):
        M = M - scale / 2  # negative costs are allowed
    lo, hi = eps_range
    eps = float(math.exp(draw(st.floats(math.log(lo), math.log(hi)))))
    empty = []
    if B > 1 and draw(st.integers(0, 5)) == 0:
        r = draw(st.integers(0, B - 1))
        a[r], b[r] = 0.0, 0.0
        empty = [r]
    bad_rows = []
    if bad and draw(st.integers(0, 3)) == 0:
        where = draw(st.sampled_from(["a_nan", "b_inf", "cost_nan", "cost_inf"]))
        r = draw(st.integers(0, B - 1))
        if where == "a_nan":
            a[r, draw(st.integers(0, m - 1))] = math.nan
        elif where == "b_inf":
            b[r, draw(st.integers(0, n - 1))] = math.inf
        else:
            val = math.nan if where == "cost_nan" else draw(st.sampled_from([math.inf, -math.inf]))
            idx = (r,) if per_row else ()
            M[idx + (draw(st.integers(0, m - 1)), draw(st.integers(0, n - 1)))] = val
        bad_rows = [r] if (where in ("a_nan", "b_inf") or per_row) else list(range(B))
        empty = [e for e in empty if e not in bad_rows]
    a, b, M = a.to(dtype), b.to(dtype), M.to(dtype)
    if draw(st.booleans()):
        a, b, M = non_contiguous(a), non_contiguous(b), non_contiguous(M)
    tol = draw(st.sampled_from([None, None, 1e-3, 1e-6]))
    opts = dict(n_iters=draw(st.integers(1, 40)), tol=tol,
                check_every=draw(st.integers(1, 7)))
    return OTCase(a, b, M, eps, opts, bad_rows, empty)


def floor(dtype, cost, eps, *masses):
    """Expected disagreement, in cost units, between two correct implementations that round
    differently: one unit roundoff of the potentials in units of eps (which reach ``max|M|/eps``
    and ``|log|`` of the smallest mass) turns into that relative error of the plan, so of the loss
    ``~ u * cond * max(1, max|M|)`` (docs/guarantees.md, precision floor)."""
    u = torch.finfo(dtype).eps
    fin = lambda x: x[torch.isfinite(x)]  # noqa: E731
    big = float(fin(cost).abs().max()) if fin(cost).numel() else 0.0
    logs = [float(fin(torch.log(x[x > 0].double())).abs().max()) for x in masses
            if fin(x[x > 0]).numel()]
    cond = max([1.0, big / eps] + logs)
    return u * cond, max(1.0, big)


@dataclass
class KDCase:
    zs: torch.Tensor
    zt: torch.Tensor
    cost: torch.Tensor
    tau: float
    eps: float
    opts: dict
    bad_rows: list = field(default_factory=list)

    def __repr__(self):
        return (f"KDCase(B={self.zs.shape[0]}, C_S={self.zs.shape[1]}, C_T={self.zt.shape[1]}, "
                f"dtype={self.zs.dtype}, cost={tuple(self.cost.shape)}, tau={self.tau:.3g}, "
                f"eps={self.eps:.3g}, opts={self.opts}, bad={self.bad_rows})")


@st.composite
def kd_cases(draw, max_b=4, max_k=9, dtypes=(torch.float32, torch.float64), bad=True):
    """Student / teacher logits and a cost in the promised range; optionally a -inf teacher
    logit (a zero probability) and a row with a NaN or inf logit."""
    B = draw(st.integers(1, max_b))
    C_S, C_T = draw(st.integers(1, max_k)), draw(st.integers(1, max_k))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2 ** 16))
    g = generator(seed)
    zscale = draw(st.sampled_from([0.1, 3.0, 20.0]))
    zs = zscale * torch.randn(B, C_S, dtype=torch.float64, generator=g)
    zt = zscale * torch.randn(B, C_T, dtype=torch.float64, generator=g)
    if C_T > 1 and draw(st.integers(0, 3)) == 0:
        zt[draw(st.integers(0, B - 1)), draw(st.integers(0, C_T - 1))] = -math.inf
    per_row = draw(st.booleans())
    scale = draw(st.sampled_from([1e-3, 1.0, 10.0]))
    M = scale * torch.rand(*((B, C_T, C_S) if per_row else (C_T, C_S)), dtype=torch.float64,
                           generator=generator(seed + 1))
    bad_rows = []
    if bad and draw(st.integers(0, 3)) == 0:
        r = draw(st.integers(0, B - 1))
        x = zs if draw(st.booleans()) else zt
        x[r, draw(st.integers(0, x.shape[1] - 1))] = draw(st.sampled_from([math.nan, math.inf]))
        bad_rows = [r]
    zs, zt, M = zs.to(dtype), zt.to(dtype), M.to(dtype)
    if draw(st.booleans()):
        zs, zt, M = non_contiguous(zs), non_contiguous(zt), non_contiguous(M)
    tau = float(math.exp(draw(st.floats(math.log(0.5), math.log(10.0)))))
    eps = float(math.exp(draw(st.floats(math.log(1e-3), math.log(10.0)))))
    opts = dict(n_iters=draw(st.integers(1, 40)), tol=draw(st.sampled_from([None, 1e-3, 1e-6])),
                check_every=draw(st.integers(1, 7)))
    return KDCase(zs, zt, M, tau, eps, opts, bad_rows)
