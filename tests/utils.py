"""Shared test utilities: problem generators, per-dtype tolerances and assertion helpers.

Every kernel test draws its inputs from the generators here, so that a backend is always checked
on the same kind of problem as the reference: marginals with optional exact zeros, costs on a
given scale (shared or per row) and logits. Generators draw from torch's global generator (which
``tests/conftest.py`` seeds before every test) or from an explicit ``seed``, and build in float64
before casting, so a float32 problem and its float64 twin hold the same values.
"""
from __future__ import annotations

import math

import pytest
import torch

# Relative / absolute agreement of a compiled backend with the reference, per compute dtype.
# Absolute tolerances are multiplied by max(1, max|M|): the loss is a difference of terms as
# large as the cost, so its error scales with it.
TOL = {
    torch.float32: dict(loss_rtol=1e-5, loss_atol=2e-6, pot_atol=2e-5, err_atol=2e-5,
                        err_rtol=1e-3, grad_atol=1e-5),
    torch.float64: dict(loss_rtol=1e-10, loss_atol=1e-12, pot_atol=1e-10, err_atol=1e-11,
                        err_rtol=1e-8, grad_atol=1e-11),
}

# Half-precision inputs are rounded by up to 2^-8 (bfloat16) relative before they are widened.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def generator(seed: int | None) -> torch.Generator | None:
    """A generator seeded with ``seed``, or None (torch's global generator) for ``seed=None``."""
    return None if seed is None else torch.Generator().manual_seed(seed)


def marginals(B: int, k: int, dtype=torch.float64, *, seed: int | None = None, spread: float = 2.0,
              zeros: bool = False, device="cpu") -> torch.Tensor:
    """(B, k) probability rows, softmax of ``spread``-scaled normals; with ``zeros`` (k > 2)
    column 1 of every row and the last entry of row 0 are exactly 0 (renormalised), so zeros
    shared by all rows and zeros of one row are both covered."""
    p = torch.softmax(spread * torch.randn(B, k, dtype=torch.float64, generator=generator(seed)),
                      -1)
    if zeros and k > 2:
        p[:, 1] = 0.0
        p[0, -1] = 0.0
        p = p / p.sum(-1, keepdim=True)
    return p.to(dtype=dtype, device=device)


def cost(m: int, n: int, dtype=torch.float64, *, seed: int | None = None, scale: float = 1.0,
         batch: int | None = None, device="cpu") -> torch.Tensor:
    """Uniform costs in ``[0, scale]``: (m, n) shared, or (batch, m, n) per row."""
    shape = (m, n) if batch is None else (batch, m, n)
    M = scale * torch.rand(*shape, dtype=torch.float64, generator=generator(seed))
    return M.to(dtype=dtype, device=device)


def logits(B: int, k: int, dtype=torch.float64, *, seed: int | None = None, scale: float = 3.0,
           device="cpu") -> torch.Tensor:
    """(B, k) logits, ``scale``-scaled normals."""
    z = scale * torch.randn(B, k, dtype=torch.float64, generator=generator(seed))
    return z.to(dtype=dtype, device=device)


def ot_problem(B: int, m: int, n: int, dtype=torch.float64, *, seed: int | None = None,
               scale: float = 1.0, per_row: bool = False, zeros: bool = False, device="cpu"):
    """``(a, b, M)`` for one batched OT problem."""
    seeds = (None, None, None) if seed is None else (seed, seed + 1, seed + 2)
    a = marginals(B, m, dtype, seed=seeds[0], zeros=zeros, device=device)
    b = marginals(B, n, dtype, seed=seeds[1], zeros=zeros, device=device)
    M = cost(m, n, dtype, seed=seeds[2], scale=scale, batch=B if per_row else None,
             device=device)
    return a, b, M


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values in a transposed-storage view (not contiguous for 2-D and larger)."""
    if x.dim() < 2:
        return x[::1]
    y = x.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not y.is_contiguous() or min(x.shape[-2:]) == 1
    return y


def assert_close(got, want, *, rtol: float = 0.0, atol: float = 0.0, name: str = "value",
                 equal_nan: bool = True) -> None:
    """``|got - want| <= atol + rtol |want|`` elementwise, NaN matching NaN and -inf matching
    -inf; on failure the message names the worst entry, its values and both tolerances."""
    got = torch.as_tensor(got).detach().cpu().double()
    want = torch.as_tensor(want).detach().cpu().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    both_nan = torch.isnan(got) & torch.isnan(want)
    same_inf = torch.isinf(got) & torch.isinf(want) & (torch.sign(got) == torch.sign(want))
    skip = same_inf | (both_nan if equal_nan else torch.zeros_like(both_nan))
    diff = torch.where(skip, torch.zeros_like(got), (got - want).abs())
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
    bound = atol + rtol * torch.where(skip, torch.zeros_like(want), want.abs())
    excess = diff - bound
    if bool((excess > 0).any()):
        idx = int(excess.flatten().argmax())
        where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), got.shape)) \
            if got.dim() else ()
        bad = int((excess > 0).sum())
        raise AssertionError(
            f"{name}: {bad} of {got.numel()} entries differ; worst at {where}: got "
            f"{got.flatten()[idx].item()!r}, want {want.flatten()[idx].item()!r} (|diff| "
            f"{diff.flatten()[idx].item():.3e} > atol {atol:.1e} + rtol {rtol:.1e} * |want|)")


def central_difference(f, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    """Gradient of the scalar ``f(x)`` by central differences, one coordinate at a time
    (float64 inputs; ``h`` around 1e-6 balances truncation against rounding there)."""
    g = torch.zeros_like(x)
    flat = x.detach().clone().flatten()
    for i in range(flat.numel()):
        e = torch.zeros_like(flat)
        e[i] = h
        hi = float(f((flat + e).view_as(x)))
        lo = float(f((flat - e).view_as(x)))
        g.view(-1)[i] = (hi - lo) / (2 * h)
    return g


def random_coordinates(x: torch.Tensor, k: int, *, seed: int = 0) -> torch.Tensor:
    """``k`` flat indices of ``x`` drawn without replacement with a fixed seed (all of them when
    ``x`` has at most ``k`` entries): finite differences on a few coordinates chosen at random
    test a gradient almost as well as on all of them, at a fraction of the solves."""
    n = x.numel()
    if n <= k:
        return torch.arange(n)
    return torch.randperm(n, generator=generator(seed))[:k]


def central_difference_at(f, x: torch.Tensor, coords: torch.Tensor, h: float = 1e-6
                          ) -> torch.Tensor:
    """Partial derivatives of the scalar ``f(x)`` at the flat indices ``coords`` by central
    differences (float64)."""
    flat = x.detach().clone().flatten()
    out = torch.zeros(len(coords), dtype=torch.float64)
    for k, i in enumerate(coords.tolist()):
        e = torch.zeros_like(flat)
        e[i] = h
        out[k] = (float(f((flat + e).view_as(x))) - float(f((flat - e).view_as(x)))) / (2 * h)
    return out


def gradient(f, x: torch.Tensor) -> torch.Tensor:
    """``d f / d x`` at ``x`` (a fresh leaf), without a graph: the first derivative that a
    finite-difference check of a second derivative differentiates."""
    x = x.detach().clone().requires_grad_(True)
    return torch.autograd.grad(f(x), x)[0]


def directional_difference(f, x: torch.Tensor, v: torch.Tensor, h: float = 1e-6):
    """``(f(x + h v) - f(x - h v)) / 2h``: the derivative of ``f`` along ``v`` (``f`` may return
    a scalar or a tensor, e.g. a gradient for a Hessian-vector product)."""
    x = x.detach()
    hi, lo = f(x + h * v), f(x - h * v)
    return (hi - lo) / (2 * h)


def require_backend(registry, name: str, device="cpu"):
    """The backend object, or skip the test with the reason it is unavailable here."""
    reason = registry.unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"backend {name!r} unavailable: {reason}")
    if name not in registry.available(device):
        pytest.skip(f"backend {name!r} does not run on {device} tensors here")
    return registry.load(name)
