"""sk.partial_ot reference: the exact KL projection (docs/ops/partial_ot.md), paper 2's Alg. 1
("bregman"), rows that cannot carry mass, huge scores, both open-set loss formulations."""

import math

import numpy as np
import pytest
import torch

import selkd_kernels as sk
from selkd_kernels.ops.partial_ot import reference as R
from tests.utils import assert_close, central_difference, logits


def bisection_projection(z, gamma, eps):
    """Independent solution: kappa by bisection on sum_i min(kappa r_i, 1) = gamma (log domain)."""
    x = z / eps
    mx = x.max(1, keepdims=True)
    l = (mx + np.log(np.exp(x - mx).sum(1, keepdims=True)))[:, 0]
    lo, hi = -l.max() - 50.0, -l.min() + 50.0  # log kappa brackets: all rows tiny / all saturated

    def total(t):
        return np.minimum(np.exp(t + l), 1.0).sum()
    for _ in range(400):
        mid = 0.5 * (lo + hi)
        if total(mid) < gamma:
            lo = mid
        else:
            hi = mid
    t = 0.5 * (lo + hi)
    log_s = np.minimum(t, -l)
    return np.exp(x + log_s[:, None])


def kl_objective(P, z, eps):
    K = np.exp(z / eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(P > 0, P * (np.log(P) - z / eps), 0.0)
    return float((t - P + K).sum())


def alg1_literal(z, gamma, eps, n_iters):
    """Paper 2, Alg. 1 transcribed in the standard domain (moderate scores only)."""
    P = np.exp(z / eps)
    for _ in range(n_iters):
        P = P / np.maximum(P.sum(1), 1.0)[:, None]
        P = P * gamma / P.sum()
    return P


CASES = [(1, 1), (1, 4), (5, 1), (7, 3), (16, 5), (33, 21), (64, 11)]


@pytest.mark.parametrize("m,k", CASES)
@pytest.mark.parametrize("scale", [0.01, 1.0, 6.0])
def test_exact_matches_bisection_and_constraints(m, k, scale):
    g = torch.Generator().manual_seed(m * 100 + k)
    z = torch.randn(m, k, generator=g, dtype=torch.float64) * scale
    for gamma in [1e-3 * m, 0.37 * m, m - 0.5 if m > 1 else 0.5, float(m)]:
        gamma = max(gamma, 1e-6)
        P = sk.partial_ot(z, gamma, eps=0.5, backend="torch")
        want = bisection_projection(z.numpy(), gamma, 0.5)
        np.testing.assert_allclose(P.numpy(), want, rtol=1e-9, atol=1e-12)
        assert abs(P.sum().item() - gamma) <= 1e-9 * max(1.0, gamma)
        assert (P.sum(1) <= 1 + 1e-12).all()
        assert (P >= 0).all()


def test_exact_minimises_kl_objective_scipy():
    scipy_opt = pytest.importorskip("scipy.optimize")
    torch.manual_seed(3)
    m, k, eps, gamma = 4, 3, 0.8, 2.2
    z = torch.randn(m, k, dtype=torch.float64) * 1.5
    zn = z.numpy()
    cons = [{"type": "eq", "fun": lambda p: p.sum() - gamma},
            {"type": "ineq", "fun": lambda p: 1.0 - p.reshape(m, k).sum(1)}]
    res = scipy_opt.minimize(lambda p: kl_objective(p.reshape(m, k), zn, eps),
                             np.full(m * k, gamma / (m * k)), method="SLSQP",
                             bounds=[(1e-12, None)] * (m * k), constraints=cons,
                             options={"ftol": 1e-14, "maxiter": 500})
    P = sk.partial_ot(z, gamma, eps=eps, backend="torch").numpy()
    np.testing.assert_allclose(P, res.x.reshape(m, k), atol=2e-5)
    assert kl_objective(P, zn, eps) <= res.fun + 1e-10


@pytest.mark.parametrize("scale,eps", [(1e4, 1e-2), (1e-9, 1.0), (300.0, 1e-3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_and_tiny_scores_stay_finite(scale, eps, dtype):
    torch.manual_seed(1)
    z = (torch.randn(20, 6) * scale).to(dtype)
    for method in ["exact", "bregman"]:
        log_p = sk.partial_ot(z, 7.5, eps=eps, method=method, backend="torch", log=True)
        assert torch.isfinite(log_p).all()
        ref = sk.partial_ot(z.double(), 7.5, eps=eps, method=method, backend="torch", log=True)
        # float32 carries Z/eps with absolute resolution ~ 2^-23 |Z/eps|; log P inherits it
        tol = 1e-12 if dtype == torch.float64 else 8 * 2.0 ** -23 * (z.abs().max().item() / eps)
        assert (log_p.double() - ref).abs().max().item() <= tol + 1e-5
        P = torch.exp(ref)
        assert abs(P.sum().item() - 7.5) < 1e-9 and (P.sum(1) <= 1 + 1e-12).all()
    if scale < 1:  # all scores ~equal: K ~ 1, every row mass k > 1... exact spreads gamma evenly
        P = sk.partial_ot(z, 7.5, eps=eps, backend="torch").double()
        torch.testing.assert_close(P, torch.full_like(P, 7.5 / 120), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m,k", [(1, 1), (6, 3), (17, 5)])
@pytest.mark.parametrize("n_iters", [1, 3, 10])
def test_bregman_is_alg1_as_written(m, k, n_iters):
    torch.manual_seed(m + n_iters)
    z = torch.randn(m, k, dtype=torch.float64) * 2 - 1.5  # rows on both sides of mass 1
    for gamma in [0.2 * m, 0.8 * m]:
        P = sk.partial_ot(z, gamma, eps=0.9, method="bregman", n_iters=n_iters, backend="torch")
        np.testing.assert_allclose(P.numpy(), alg1_literal(z.numpy(), gamma, 0.9, n_iters),
                                   rtol=1e-12, atol=1e-15)


def test_alg1_is_not_the_projection():
    """When every row of K starts above mass 1, Alg. 1's first clip makes all rows 1 and the
    rescale leaves softmax(Z/eps) * gamma/m, a fixed point of every later round: every row ends
    with the same mass gamma/m. The projection instead multiplies every unsaturated row of K by one
    common kappa, so heavier rows of K keep more mass, and it reaches a strictly lower KL
    objective."""
    torch.manual_seed(0)
    m, k, gamma, eps = 8, 4, 5.0, 1.0
    z = torch.randn(m, k, dtype=torch.float64) + 2.0  # exp(z) rows sum well above 1
    assert (torch.logsumexp(z, 1) > 0).all()
    soft = torch.softmax(z, 1) * gamma / m
    for n_iters in [1, 2, 10, 100]:
        Pb = sk.partial_ot(z, gamma, eps=eps, method="bregman", n_iters=n_iters, backend="torch")
        torch.testing.assert_close(Pb, soft, rtol=1e-12, atol=1e-15)
    Pe = sk.partial_ot(z, gamma, eps=eps, method="exact", backend="torch")
    assert (Pe - soft).abs().max() > 1e-3
    zn = z.numpy()
    assert kl_objective(Pe.numpy(), zn, eps) < kl_objective(soft.numpy(), zn, eps) - 1e-3
    # both are feasible: the difference is optimality, not constraint violation
    for P in (Pe, soft):
        assert abs(P.sum().item() - gamma) < 1e-12 and (P.sum(1) <= 1 + 1e-12).all()


@pytest.mark.parametrize("method", ["exact", "bregman"])
@pytest.mark.parametrize("gamma", [0.7, 3.3, 6.0])
def test_gradcheck(method, gamma):
    torch.manual_seed(2)
    z = (torch.randn(6, 4, dtype=torch.float64) * 1.5).requires_grad_()
    w = torch.rand(6, 4, dtype=torch.float64)

    def f(z):
        log_p = sk.partial_ot(z, gamma, eps=0.7, method=method, n_iters=5, backend="torch",
                              log=True)
        return (w * log_p).sum() + (torch.exp(log_p) * w).sum()
    assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


def test_closed_form_gradient_matches_autograd():
    torch.manual_seed(4)
    for method in ["exact", "bregman"]:
        z = torch.randn(9, 5, dtype=torch.float64).requires_grad_()
        G = torch.randn(9, 5, dtype=torch.float64)
        log_p, rho, sat = R.log_coupling(z, 4.2, 0.6, method, 7)
        (g_auto,) = torch.autograd.grad((G * log_p).sum(), z)
        l = torch.logsumexp(z.detach() / 0.6, 1)
        g_cf = R.grad_scores(0.6, log_p.detach(), l, rho.detach(), sat, 4.2, method, 7, G)
        torch.testing.assert_close(g_cf, g_auto, rtol=1e-10, atol=1e-12)


def test_gamma_from_labels():
    torch.manual_seed(5)
    z = torch.randn(10, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 3, 1, 2, 3, 0, 0, 3, 1])  # 3 = "not selected": 6 selected
    P = sk.partial_ot(z, "labels", labels=y, backend="torch")
    assert abs(P.sum().item() - 6.0) < 1e-12
    P2 = sk.partial_ot(z, "labels", labels=y < 3, backend="torch")
    torch.testing.assert_close(P, P2)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, 10.5, float("nan"), float("inf"), "all", True])
def test_bad_gamma_raises(bad):
    z = torch.randn(10, 3)
    with pytest.raises(ValueError, match="gamma"):
        sk.partial_ot(z, bad)


def test_bad_inputs_raise_naming_argument():
    z = torch.randn(5, 3)
    with pytest.raises(ValueError, match="scores"):
        sk.partial_ot(torch.randn(5), 1.0)
    with pytest.raises(ValueError, match="scores"):
        sk.partial_ot(torch.ones(5, 3, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="scores"):
        sk.partial_ot(torch.randn(0, 3), 1.0)
    with pytest.raises(ValueError, match="eps"):
        sk.partial_ot(z, 1.0, eps=0.0)
    with pytest.raises(ValueError, match="method"):
        sk.partial_ot(z, 1.0, method="sinkhorn")
    with pytest.raises(ValueError, match="n_iters"):
        sk.partial_ot(z, 1.0, method="bregman", n_iters=0)
    with pytest.raises(ValueError, match="backend"):
        sk.partial_ot(z, 1.0, backend="gpu")
    with pytest.raises(ValueError, match="labels"):
        sk.partial_ot(z, "labels")
    with pytest.raises(ValueError, match="labels"):
        sk.partial_ot(z, "labels", labels=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="gamma"):
        sk.partial_ot(z, "labels", labels=torch.full((5,), 2))  # nobody selected


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_do_not_give_finite_looking_coupling(bad):
    z = torch.randn(6, 3, dtype=torch.float64)
    z[2, 1] = bad
    for be in sk.available_partial_ot_backends("cpu"):
        for method in ["exact", "bregman"]:
            P = sk.partial_ot(z, 3.0, method=method, backend=be)
            if bad == -float("inf"):
                # a -inf score is a legitimate "impossible" entry: zero mass, rest unaffected
                assert P[2, 1] == 0 and torch.isfinite(P).all()
                assert abs(P.sum().item() - 3.0) < 1e-9
            else:
                assert not torch.isfinite(P).all()


@pytest.mark.parametrize("method", ["exact", "bregman"])
def test_float32_huge_scores_keep_total_mass(method):
    """|Z/eps| ~ 1e8 in float32: the solve's sums are taken relative to a row of the batch, so the
    total mass stays gamma (it was 1 instead of 2 when log kappa was formed in absolute terms)."""
    for seed in range(5):
        z = logits(5, 3, torch.float32, seed=seed, scale=1e8)
        P = sk.partial_ot(z, 2.0, eps=1.0, method=method, backend="torch")
        assert abs(P.sum().item() - 2.0) < 1e-5, (seed, P.sum(1))
        assert (P.sum(1) <= 1 + 1e-6).all()


@pytest.mark.parametrize("method", ["exact", "bregman"])
def test_nan_rows_are_left_out_of_the_batch(method):
    """A NaN row gets NaN; the clean rows are coupled exactly as if it were absent (total mass
    min(gamma, clean rows))."""
    z = logits(9, 4, seed=3)
    z[[2, 6], 1] = float("nan")
    clean = [i for i in range(9) if i not in (2, 6)]
    for gamma in [3.0, 8.5]:
        P = sk.partial_ot(z, gamma, method=method, n_iters=5, backend="torch")
        assert torch.isnan(P[[2, 6]]).all()
        want = sk.partial_ot(z[clean], min(gamma, 7.0), method=method, n_iters=5,
                             backend="torch")
        assert_close(P[clean], want, rtol=1e-13, atol=1e-15, name="clean rows")
        assert abs(P[clean].sum().item() - min(gamma, 7.0)) < 1e-12


@pytest.mark.parametrize("method", ["exact", "bregman"])
def test_rows_of_minus_inf_carry_no_mass(method):
    z = logits(6, 3, seed=4)
    z[1] = -float("inf")
    log_p, rho, _ = R.log_coupling(z, 2.5, 0.8, method, 4)
    assert rho[1] == -float("inf") and (log_p[1] == -float("inf")).all()
    rest = [0, 2, 3, 4, 5]
    want, _, _ = R.log_coupling(z[rest], 2.5, 0.8, method, 4)
    assert_close(log_p[rest], want, rtol=1e-13, atol=1e-14, name="log P of the other rows")
    # nothing can carry the mass: NaN, not a made-up coupling
    log_p, rho, _ = R.log_coupling(torch.full((3, 2), -float("inf"), dtype=torch.float64), 1.0,
                                   1.0, method, 3)
    assert torch.isnan(rho).all()


def test_fallback_formula_and_gamma_equal_rows():
    g = torch.tensor([0.3, 1.0, 2.0, 2.5, 7.0], dtype=torch.float64)
    assert R.fallback_saturated(g).tolist() == [0.0, 0.0, 1.0, 2.0, 6.0]
    # gamma = m: every row ends with mass 1 (m - 1 saturated, the lightest takes the rest)
    z = logits(7, 3, seed=5)
    P = sk.partial_ot(z, 7.0, backend="torch")
    assert_close(P.sum(1), torch.ones(7, dtype=torch.float64), atol=1e-14, name="row masses")


def test_log_kappa_scales_the_unsaturated_rows():
    z = logits(20, 4, seed=6)
    l = R.row_log_mass(z, 0.5)
    rho, sat, k = R.rho_exact(l, 9.0)
    lk = R.log_kappa_exact(l, 9.0)
    assert int(k) == int(sat.sum()) and int(k) > 0
    assert_close(rho[~sat], l[~sat] + lk, rtol=1e-13, atol=1e-13, name="rho of free rows")
    assert (l[sat] + lk >= -1e-12).all()  # saturated rows would exceed mass 1


def _consistent_loss_by_hand(zs, zt, y, gamma, eps, lam):
    """The consistent formulation written per row with the (n + 1)-outcome distribution
    [P_i1 .. P_in, 1 - sum_j P_ij] (docs/selective_kd.md)."""
    m, n = zs.shape
    ps = sk.partial_ot(zs, gamma, eps=eps, backend="torch")
    pt = sk.partial_ot(zt, gamma, eps=eps, backend="torch")
    total = 0.0
    for i in range(m):
        dist_s = torch.cat([ps[i], (1 - ps[i].sum()).clamp_min(R.NOT_SELECTED_FLOOR)[None]])
        dist_t = torch.cat([pt[i], (1 - pt[i].sum()).clamp_min(0)[None]])
        target = torch.zeros(n + 1, dtype=torch.float64)
        target[int(y[i])] = 1.0
        total -= ((target + lam * dist_t) * torch.log(dist_s)).sum()
    return total / m


def test_consistent_loss_is_the_row_cross_entropy():
    zs, zt = logits(10, 3, seed=7), logits(10, 3, seed=8, scale=4.0)
    y = torch.tensor([0, 3, 1, 3, 2, 3, 3, 0, 1, 3])  # 3 = not selected
    want = _consistent_loss_by_hand(zs, zt, y, 5.0, 0.8, 1.3)
    got = R.open_set_loss(zs, zt, y, 5.0, 0.8, 1.3, "exact", 10, "consistent")
    assert_close(got, want, rtol=1e-12, atol=1e-12, name="consistent loss")


@pytest.mark.parametrize("formulation", ["paper", "consistent"])
@pytest.mark.parametrize("method", ["exact", "bregman"])
def test_closed_form_loss_gradient_matches_finite_differences(formulation, method):
    """The torch backend's fused forward (closed form, no autograd) against central differences
    of the reference loss, float64; rows without labels (-1) included."""
    k = 4 if formulation == "paper" else 3
    zs, zt = logits(7, k, seed=9), logits(7, k, seed=10, scale=4.0)
    y = torch.tensor([0, k - 1, 1, -1, 2, k - 1, -1])
    if formulation == "consistent":
        y[[1, 5]] = k  # "not selected"

    def f(z):
        return R.open_set_loss(z, zt, y, 3.2, 0.7, 1.5, method, 5, formulation)
    loss, grad = R.loss_and_grad(zs, zt, y, 3.2, 0.7, 1.5, method, 5, formulation)
    assert_close(loss, f(zs), rtol=1e-13, atol=1e-13, name="loss")
    assert_close(grad, central_difference(f, zs), rtol=1e-6, atol=1e-8, name="gradient")


def test_saturated_unselected_row_is_floored_not_infinite():
    """Consistent formulation: an unselected sample whose row saturates (mass 1) gets the floored
    loss -log(NOT_SELECTED_FLOOR) and no gradient through its mass, instead of +inf / NaN."""
    zs = torch.tensor([[9.0, 0.0], [0.0, 0.0], [-1.0, -2.0]], dtype=torch.float64)
    y = torch.tensor([2, 0, 1])  # row 0 is "not selected" yet the heaviest row
    log_p, rho, sat = R.log_coupling(zs, 2.0, 1.0)
    assert bool(sat[0])
    loss, grad = R.loss_and_grad(zs, zs, y, 2.0, 1.0, 0.0, "exact", 10, "consistent")
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() >= -math.log(R.NOT_SELECTED_FLOOR) / 3


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(m=st.integers(1, 40), k=st.integers(1, 8), frac=st.floats(1e-6, 1.0),
       log_scale=st.floats(-8, 4), shift=st.floats(-50, 50), seed=st.integers(0, 2 ** 16),
       eps=st.sampled_from([1e-3, 0.1, 1.0, 10.0]))
def test_exact_constraints_property(m, k, frac, log_scale, shift, seed, eps):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(m, k, generator=g, dtype=torch.float64) * 10 ** log_scale + shift
    gamma = frac * m
    log_p = sk.partial_ot(z, gamma, eps=eps, backend="torch", log=True)
    assert torch.isfinite(log_p).all()
    P = torch.exp(log_p)
    assert abs(P.sum().item() - gamma) <= 1e-9 * max(1.0, gamma)
    assert (P.sum(1) <= 1 + 1e-12).all()
    # KKT: rows below mass 1 share one scaling kappa of their K rows (log: rho - l constant)
    l = torch.logsumexp(z / eps, 1)
    rho = torch.logsumexp(log_p, 1)
    free = rho < -1e-9
    if free.sum() > 1:
        c = (rho - l)[free]
        assert (c - c[0]).abs().max() <= 1e-9 * max(1.0, c.abs().max().item())
    # saturated rows are the ones whose K row is at least as heavy as any free row
    if free.any() and (~free).any():
        assert l[~free].min() >= l[free].max() - 1e-9 * max(1.0, l.abs().max().item())
