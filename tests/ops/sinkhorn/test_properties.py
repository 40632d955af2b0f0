"""Property tests (hypothesis) of the Sinkhorn distance."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import selkd_kernels as sk
from tests.utils import cost, marginals

@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # this module tests the torch reference: "auto" must not route to a compiled backend
    monkeypatch.setenv("SELKD_BACKEND", "torch")


SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(B=st.integers(1, 3), m=st.integers(1, 6), n=st.integers(1, 6), seed=st.integers(0, 999),
       c=st.floats(-5, 5), eps=st.sampled_from([0.05, 0.3, 1.0]), iters=st.integers(1, 40))
def test_adding_constant_to_cost_adds_constant_to_loss(B, m, n, seed, c, eps, iters):
    # the plan is unchanged and sum(T) = 1, at every iteration, not only at convergence
    a, b = marginals(B, m, seed=seed, spread=2.0), marginals(B, n, seed=seed + 1, spread=1.0)
    M = cost(m, n, seed=seed)
    r0 = sk.sinkhorn(a, b, M, eps=eps, n_iters=iters, method="log")
    r1 = sk.sinkhorn(a, b, M + c, eps=eps, n_iters=iters, method="log")
    torch.testing.assert_close(r1.loss, r0.loss + c, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(m=st.integers(1, 8), seed=st.integers(0, 999), eps=st.sampled_from([0.01, 0.1, 0.5]))
def test_zero_cost_perfect_matching_gives_entropy_term_only(m, seed, eps):
    # M = 0 on the diagonal and prohibitive elsewhere: T = diag(a), so S = -eps H(diag(a))
    a = marginals(2, m, seed=seed, spread=1.5)
    M = torch.full((m, m), 80.0 * eps, dtype=torch.float64).fill_diagonal_(0.0)
    r = sk.sinkhorn(a, a.clone(), M, eps=eps, n_iters=500, tol=1e-13)
    expected = eps * (a * (a.log() - 1)).sum(-1)
    torch.testing.assert_close(r.loss, expected, rtol=1e-9, atol=1e-12)


@SETTINGS
@given(m=st.integers(1, 6), n=st.integers(1, 6), seed=st.integers(0, 999))
def test_symmetry_under_swapping_sides(m, n, seed):
    a, b = marginals(2, m, seed=seed, spread=2.0), marginals(2, n, seed=seed + 7, spread=1.0)
    M = cost(m, n, seed=seed)
    r1 = sk.sinkhorn(a, b, M, eps=0.2, n_iters=5000, tol=1e-13)
    r2 = sk.sinkhorn(b, a, M.T, eps=0.2, n_iters=5000, tol=1e-13)
    torch.testing.assert_close(r1.loss, r2.loss, rtol=1e-9, atol=1e-10)


@SETTINGS
@given(m=st.integers(2, 6), n=st.integers(1, 6), seed=st.integers(0, 999))
def test_invariant_to_permuting_classes(m, n, seed):
    a, b = marginals(2, m, seed=seed, spread=2.0), marginals(2, n, seed=seed + 3, spread=1.0)
    M = cost(m, n, seed=seed)
    p = torch.randperm(m, generator=torch.Generator().manual_seed(seed))
    r1 = sk.sinkhorn(a, b, M, eps=0.2, n_iters=5000, tol=1e-13)
    r2 = sk.sinkhorn(a[:, p], b, M[p], eps=0.2, n_iters=5000, tol=1e-13)
    torch.testing.assert_close(r1.loss, r2.loss, rtol=1e-9, atol=1e-10)
