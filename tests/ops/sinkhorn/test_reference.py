"""The torch reference solver against POT, and its own invariants (docs/ops/sinkhorn.md)."""
import math
import warnings

import numpy as np
import pytest
import torch

import selkd_kernels as sk
from selkd_kernels.ops.sinkhorn import reference as ref
from tests.oracles import pot_batch_losses

@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # this module tests the torch reference: "auto" must not route to a compiled backend
    monkeypatch.setenv("SELKD_BACKEND", "torch")


warnings.filterwarnings("ignore", message="selkd_kernels: backend")

TOL = {torch.float64: 1e-6, torch.float32: 1e-4}        # relative agreement with POT
SOLVER_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}  # marginal L1 error to stop at

SHAPES = [(1, 1, 1), (1, 1, 5), (1, 6, 1), (3, 7, 13), (2, 31, 17), (1, 100, 3)]


def _problem(B, m, n, dtype, scale=1.0, sharp=2.0, per_row=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.softmax(sharp * torch.randn(B, m, generator=g, dtype=torch.float64), -1)
    b = torch.softmax(torch.randn(B, n, generator=g, dtype=torch.float64), -1)
    shape = (B, m, n) if per_row else (m, n)
    M = scale * torch.rand(*shape, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype), M.to(dtype)


def _assert_rel(x, expected, rtol):
    x = np.asarray(x, dtype=np.float64)
    err = np.abs(x - expected) / np.maximum(np.abs(expected), 1e-3)
    assert np.all(err <= rtol), f"relative errors {err} exceed {rtol}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("B,m,n", SHAPES)
@pytest.mark.parametrize("eps", [1.0, 0.1, 0.01])
def test_loss_matches_pot(B, m, n, eps, dtype):
    a, b, M = _problem(B, m, n, dtype)
    r = sk.sinkhorn(a, b, M, eps=eps, n_iters=5000, tol=SOLVER_TOL[dtype], backend="torch")
    assert r.loss.dtype == dtype and r.alpha.shape == (B, m) and r.beta.shape == (B, n)
    _assert_rel(r.loss.numpy(), pot_batch_losses(a, b, M, eps), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [1e-2, 1e-3])
def test_small_eps_with_eps_scaling_matches_pot(eps, dtype):
    a, b, M = _problem(3, 5, 6, dtype, seed=3)
    r = sk.sinkhorn(a, b, M, eps=eps, n_iters=20000, tol=SOLVER_TOL[dtype], eps_scaling=0.5,
                    backend="torch")
    _assert_rel(r.loss.numpy(), pot_batch_losses(a, b, M, eps), TOL[dtype])


def test_eps_1e3_cost_up_to_10_float64_accurate():
    a, b, M = _problem(2, 5, 6, torch.float64, scale=10.0, seed=4)
    r = sk.sinkhorn(a, b, M, eps=1e-3, n_iters=30000, tol=1e-12, eps_scaling=0.5)
    _assert_rel(r.loss.numpy(), pot_batch_losses(a, b, M, 1e-3), 1e-6)


@pytest.mark.parametrize("method", ["auto", "log"])
def test_eps_1e3_cost_up_to_10_float32_finite(method):
    # standard-domain scaling would underflow here (exp(-10/1e-3) == 0 in any float); the
    # automatic choice must switch to log-domain updates. Float32 potentials at M/eps ~ 1e4 carry
    # ~1e-3 absolute error in eps units, so agreement is ~1e-3, not 1e-6 (documented precision floor).
    a, b, M = _problem(2, 5, 6, torch.float32, scale=10.0, seed=4)
    r = sk.sinkhorn(a, b, M, eps=1e-3, n_iters=3000, eps_scaling=0.5, method=method)
    assert torch.isfinite(r.loss).all() and torch.isfinite(r.err).all()
    r_plain = sk.sinkhorn(a, b, M, eps=1e-3, n_iters=300, method=method)
    assert torch.isfinite(r_plain.loss).all() and torch.isfinite(r_plain.alpha).all()
    _assert_rel(r.loss.numpy(), pot_batch_losses(a, b, M, 1e-3), 2e-2)


def test_auto_picks_log_when_standard_would_underflow():
    M = torch.rand(4, 5) * 10
    assert ref.choose_method(M, 1e-3, torch.float32) == "log"
    assert ref.choose_method(M, 1.0, torch.float32) == "standard"
    assert ref.choose_method(M * 10, 1.0, torch.float64) == "standard"
    a, b, _ = _problem(2, 4, 5, torch.float32)
    with np.errstate(all="ignore"):
        bad = sk.sinkhorn(a, b, M, eps=1e-2, n_iters=50, method="standard", check_marginals=False)
    assert not torch.isfinite(bad.loss).all(), "standard domain should break down here"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_per_row_cost_matches_pot(dtype):
    a, b, M = _problem(3, 6, 4, dtype, per_row=True)
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=5000, tol=SOLVER_TOL[dtype])
    _assert_rel(r.loss.numpy(), pot_batch_losses(a, b, M, 0.1), TOL[dtype])
    # each row equals the same problem solved alone with a shared cost
    for i in range(3):
        ri = sk.sinkhorn(a[i:i + 1], b[i:i + 1], M[i], eps=0.1, n_iters=5000, tol=SOLVER_TOL[dtype])
        torch.testing.assert_close(ri.loss, r.loss[i:i + 1])


@pytest.mark.parametrize("method", ["log", "standard"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_zero_entries_match_reduced_problem(method, dtype):
    a, b, M = _problem(3, 8, 6, torch.float64)
    a[0, [1, 4]] = 0
    a[2, 0] = 0
    b[1, [0, 5]] = 0
    a, b = a / a.sum(-1, keepdim=True), b / b.sum(-1, keepdim=True)
    a, b, M = a.to(dtype), b.to(dtype), M.to(dtype)
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=5000, tol=SOLVER_TOL[dtype], method=method)
    assert torch.isfinite(r.loss).all()
    assert torch.isneginf(r.alpha[0, [1, 4]]).all() and torch.isneginf(r.beta[1, [0, 5]]).all()
    _assert_rel(r.loss.numpy(), pot_batch_losses(a, b, M, 0.1), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_standard_and_log_domain_agree(dtype):
    a, b, M = _problem(5, 9, 11, dtype)
    for tol in (None, 1e-5):
        lg = sk.sinkhorn(a, b, M, eps=0.2, n_iters=37, tol=tol, method="log")
        st = sk.sinkhorn(a, b, M, eps=0.2, n_iters=37, tol=tol, method="standard")
        rtol = 1e-12 if dtype == torch.float64 else 1e-5
        torch.testing.assert_close(st.loss, lg.loss, rtol=rtol, atol=rtol)
        torch.testing.assert_close(st.alpha - st.alpha[:, :1], lg.alpha - lg.alpha[:, :1],
                                   rtol=rtol * 10, atol=rtol * 10)
        assert torch.equal(st.iters, lg.iters)


def test_per_row_early_stopping():
    a, b, M = _problem(6, 10, 10, torch.float64)
    a[0] = b[0, :10]  # identical marginals on a cheap diagonal converge faster than the rest
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=1000, tol=1e-9, check_every=7)
    it = r.iters.tolist()
    assert len(set(it)) > 1, "rows should stop at different iterations"
    for k, e in zip(it, r.err.tolist()):
        assert k % 7 == 0 or k == 1000
        assert k == 1000 or e <= 1e-9
    # frozen rows are exactly where they stopped: re-running with n_iters = their count matches
    for i, k in enumerate(it):
        ri = sk.sinkhorn(a[i:i + 1], b[i:i + 1], M, eps=0.1, n_iters=k)
        torch.testing.assert_close(ri.loss, r.loss[i:i + 1], rtol=0, atol=1e-14)


def test_fixed_iterations_without_tol():
    a, b, M = _problem(3, 4, 5, torch.float32)
    r = sk.sinkhorn(a, b, M, eps=0.05, n_iters=13)
    assert r.iters.tolist() == [13, 13, 13] and r.iters.dtype == torch.int32
    assert (r.err > 1e-4).all() and r.backend == "torch"  # 13 iterations at eps=0.05: unconverged


def test_loss_is_primal_value_of_returned_plan():
    a, b, M = _problem(4, 6, 5, torch.float64)
    r = sk.sinkhorn(a, b, M, eps=0.3, n_iters=4, return_plan=True)  # far from converged
    T = r.plan
    torch.testing.assert_close(T.sum(1), b, rtol=1e-12, atol=1e-14)  # beta-update last
    torch.testing.assert_close((T.sum(2) - a).abs().sum(-1), r.err)
    H = -(T * (T.log() - 1)).sum((1, 2))
    torch.testing.assert_close(r.loss, (T * M).sum((1, 2)) - 0.3 * H)
    torch.testing.assert_close(sk.transport_plan(r, M, 0.3), T)


def test_converged_primal_equals_dual():
    a, b, M = _problem(3, 7, 9, torch.float64)
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=5000, tol=1e-13)
    dual = (r.alpha * a).sum(-1) + (r.beta * b).sum(-1) - 0.1
    torch.testing.assert_close(r.loss, dual, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("where", ["a", "b", "cost_nan", "cost_inf"])
def test_nan_or_inf_input_gives_nan_loss(where):
    a, b, M = _problem(3, 4, 5, torch.float32)
    if where == "a":
        a[1, 2] = float("nan")
    elif where == "b":
        b[1, 0] = float("inf")
    elif where == "cost_nan":
        M[0, 0] = float("nan")
    else:
        M[2, 3] = float("inf")
    r = sk.sinkhorn(a, b, M, eps=0.1, n_iters=20, check_marginals=False)
    if where in ("a", "b"):
        assert torch.isnan(r.loss[1]) and torch.isfinite(r.loss[[0, 2]]).all()
    else:
        assert torch.isnan(r.loss).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    a, b, M = _problem(2, 5, 7, torch.float64)
    r = sk.sinkhorn(a.to(dtype), b.to(dtype), M.to(dtype), eps=0.1, n_iters=200, tol=1e-6)
    assert r.loss.dtype == torch.float32
    # the rounded rows are unbalanced by ~1e-4, beyond what float32 inputs may carry
    r32 = sk.sinkhorn(a.to(dtype).float(), b.to(dtype).float(), M.to(dtype).float(), eps=0.1,
                      n_iters=200, tol=1e-6, check_marginals=False)
    torch.testing.assert_close(r.loss, r32.loss)


def test_non_contiguous_inputs():
    a, b, M = _problem(4, 6, 5, torch.float64)
    at = a.t().contiguous().t()
    Mt = M.t().contiguous().t()
    assert not at.is_contiguous() and not Mt.is_contiguous()
    r1 = sk.sinkhorn(at, b, Mt, eps=0.1, n_iters=50)
    r2 = sk.sinkhorn(a, b, M, eps=0.1, n_iters=50)
    torch.testing.assert_close(r1.loss, r2.loss)


def test_plan_weighted_sum_equals_materialised_sum():
    a, b, M = _problem(9, 4, 6, torch.float64)
    r = sk.sinkhorn(a, b, M, eps=0.2, n_iters=30)
    w = torch.randn(9, dtype=torch.float64)
    full = (ref.transport_plan(r.alpha, r.beta, M, 0.2) * w[:, None, None]).sum(0)
    chunked = ref.plan_weighted_sum(r.alpha, r.beta, M, 0.2, w, chunk_elems=2 * 24)
    torch.testing.assert_close(chunked, full)


def test_eps_schedule_is_decreasing_and_ends_at_eps():
    M = torch.tensor([[0.0, 10.0]])
    s = ref.eps_schedule(M, 1e-3, 0.5)
    assert s[0] == 10.0 and s[-1] == 1e-3
    assert all(x > y for x, y in zip(s, s[1:]))
    assert len(s) == math.ceil(math.log(1e-3 / 10) / math.log(0.5)) + 1
