"""Sinkhorn KD loss: values, envelope gradients (docs/ops/sinkhorn.md), second derivatives, and
the nn.Module (docs/losses.md)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import selkd_kernels as sk
from selkd_kernels.ops.sinkhorn.dispatch import REGISTRY
from tests.utils import (assert_close, central_difference_at, cost, directional_difference,
                         gradient, logits, random_coordinates, require_backend)


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # this module tests the torch reference: "auto" must not route to a compiled backend
    monkeypatch.setenv("SELKD_BACKEND", "torch")


warnings.filterwarnings("ignore", message="selkd_kernels: backend")

CONVERGED = dict(n_iters=20000, tol=1e-14, backend="torch")


def _kd_problem(B, C_T, C_S, dtype=torch.float64, seed=0, scale=2.0):
    """(student logits, teacher logits, cost) from the shared generators."""
    return (logits(B, C_S, dtype, seed=seed, scale=scale),
            logits(B, C_T, dtype, seed=seed + 1, scale=scale),
            cost(C_T, C_S, dtype, seed=seed + 2))


@pytest.mark.parametrize("B,C_T,C_S,tau,eps", [(1, 1, 3, 3.0, 0.1), (2, 5, 3, 3.0, 0.1),
                                               (2, 4, 7, 1.0, 0.5), (1, 6, 1, 1.0, 0.5)])
def test_envelope_gradients_match_finite_differences(B, C_T, C_S, tau, eps):
    # converged solves (tol 1e-14, early exit) and central differences on at most 6 coordinates
    # per input, drawn with a fixed seed: the shapes cover 1 class, B = 1 and odd sizes
    zs, zt, M = _kd_problem(B, C_T, C_S)
    xs = [t.clone().requires_grad_(True) for t in (zs, zt, M)]
    sk.sinkhorn_kd_loss(*xs, tau=tau, eps=eps, reduction="sum", **CONVERGED).backward()
    for k, (x, var) in enumerate(zip(xs, (zs, zt, M))):
        def f(v, k=k):
            args = [v if j == k else t for j, t in enumerate((zs, zt, M))]
            return sk.sinkhorn_kd_loss(*args, tau=tau, eps=eps, reduction="sum", **CONVERGED)
        idx = random_coordinates(var, 6, seed=k)
        fd = central_difference_at(f, var, idx, h=1e-5)
        assert_close(x.grad.flatten()[idx], fd, atol=1e-8, name=f"input {k}")


def test_envelope_matches_unrolled_gradient_at_convergence():
    zs, zt, M = _kd_problem(3, 5, 4)
    grads = {}
    for mode in ("envelope", "unrolled"):
        s, t, c = (x.clone().requires_grad_(True) for x in (zs, zt, M))
        sk.sinkhorn_kd_loss(s, t, c, eps=0.2, grad=mode, **CONVERGED).backward()
        grads[mode] = (s.grad, t.grad, c.grad)
    for ge, gu in zip(grads["envelope"], grads["unrolled"]):
        torch.testing.assert_close(ge, gu, rtol=1e-8, atol=1e-10)


def test_unrolled_differs_before_convergence():
    # a test that could not fail would be worthless: with 2 iterations the two gradients differ
    zs, zt, M = _kd_problem(2, 5, 4)
    out = []
    for mode in ("envelope", "unrolled"):
        s = zs.clone().requires_grad_(True)
        sk.sinkhorn_kd_loss(s, zt, M, eps=0.05, n_iters=2, grad=mode).backward()
        out.append(s.grad)
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_loss_equals_sinkhorn_of_softmaxes():
    zs, zt, M = _kd_problem(4, 6, 5)
    rows = sk.sinkhorn_kd_loss(zs, zt, M, tau=2.0, eps=0.1, n_iters=77, reduction="none")
    r = sk.sinkhorn(torch.softmax(zt / 2, -1), torch.softmax(zs / 2, -1), M, eps=0.1, n_iters=77)
    torch.testing.assert_close(rows, r.loss)
    torch.testing.assert_close(sk.sinkhorn_kd_loss(zs, zt, M, tau=2.0, eps=0.1, n_iters=77,
                                                   reduction="mean"), rows.mean())
    torch.testing.assert_close(sk.sinkhorn_kd_loss(zs, zt, M, tau=2.0, eps=0.1, n_iters=77,
                                                   reduction="sum"), rows.sum())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grad_output_scales_gradients(reduction):
    zs, zt, M = _kd_problem(5, 4, 6)
    w = torch.randn(5, dtype=torch.float64) if reduction == "none" else torch.tensor(3.7,
                                                                                 dtype=torch.float64)
    g = []
    for weight in (None, w):
        s, c = zs.clone().requires_grad_(True), M.clone().requires_grad_(True)
        loss = sk.sinkhorn_kd_loss(s, zt, c, n_iters=50, reduction=reduction)
        (loss.sum() if weight is None else (loss * weight).sum()).backward()
        g.append((s.grad, c.grad))
    if reduction == "none":
        # row i's gradient scales by w_i; the cost's by the weighted sum of the rows' plans
        torch.testing.assert_close(g[1][0], g[0][0] * w[:, None])
        rows = sk.sinkhorn(torch.softmax(zt / 3, -1), torch.softmax(zs / 3, -1), M, eps=0.1,
                           n_iters=50, return_plan=True)
        torch.testing.assert_close(g[1][1], (rows.plan * w[:, None, None]).sum(0))
    else:
        torch.testing.assert_close(g[1][0], 3.7 * g[0][0])
        torch.testing.assert_close(g[1][1], 3.7 * g[0][1])


def test_teacher_is_frozen_unless_asked():
    zs, zt, M = _kd_problem(3, 4, 5)
    s = zs.clone().requires_grad_(True)
    sk.sinkhorn_kd_loss(s, zt, M).backward()
    assert zt.grad is None and M.grad is None and s.grad is not None


def test_per_row_cost_gradient():
    zs, zt, _ = _kd_problem(3, 4, 5)
    M = cost(4, 5, batch=3).requires_grad_(True)
    loss = sk.sinkhorn_kd_loss(zs, zt, M, n_iters=40, reduction="sum")
    loss.backward()
    r = sk.sinkhorn(torch.softmax(zt / 3, -1), torch.softmax(zs / 3, -1), M.detach(), eps=0.1,
                    n_iters=40, return_plan=True)
    torch.testing.assert_close(M.grad, r.plan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precision_logits(dtype):
    zs, zt, M = _kd_problem(4, 6, 5, dtype=dtype)
    s = zs.clone().requires_grad_(True)
    loss = sk.sinkhorn_kd_loss(s, zt, M, n_iters=60)
    loss.backward()
    assert loss.dtype == dtype and s.grad.dtype == dtype
    ref = sk.sinkhorn_kd_loss(zs.double(), zt.double(), M.double(), n_iters=60)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.double().item() - ref.item()) <= tol * max(1.0, abs(ref.item()))


def test_nan_logits_never_give_finite_loss_or_gradient():
    zs, zt, M = _kd_problem(3, 4, 5)
    zs[1, 2] = float("nan")
    s = zs.clone().requires_grad_(True)
    loss = sk.sinkhorn_kd_loss(s, zt, M)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(s.grad[1]).all() and torch.isfinite(s.grad[[0, 2]]).all()
    zt2 = zt.clone()
    zt2[0, 0] = float("inf")
    assert torch.isnan(sk.sinkhorn_kd_loss(zs.nan_to_num(0.0), zt2, M))


def test_return_stats():
    zs, zt, M = _kd_problem(3, 4, 5)
    loss, (iters, err) = sk.sinkhorn_kd_loss(zs, zt, M, n_iters=500, tol=1e-8, return_stats=True)
    assert iters.shape == (3,) and (iters <= 500).all() and (err <= 1e-8).all()


# ---- second derivatives (create_graph=True) ----------------------------------------------------

def _penalty(zs, zt, M, **kw):
    """A gradient penalty ||dL/dz_S||^2 and its gradient w.r.t. the student logits."""
    s = zs.clone().requires_grad_(True)
    g, = torch.autograd.grad(sk.sinkhorn_kd_loss(s, zt, M, eps=0.2, **kw), s, create_graph=True)
    pen = (g ** 2).sum()
    return pen, torch.autograd.grad(pen, s)[0]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_gradient_penalty_keeps_its_kd_term(backend):
    # the issue: the envelope gradient had no graph, so this penalty's gradient came out ~0
    if backend != "torch":
        require_backend(REGISTRY, backend)
    zs, zt, M = _kd_problem(3, 5, 4)
    opts = dict(CONVERGED, backend=backend)
    pen, grad = _penalty(zs, zt, M, **opts)
    pen_u, grad_u = _penalty(zs, zt, M, grad="unrolled", **dict(opts, backend="torch"))
    assert grad.abs().max() > 1e-5, "the second-order term vanished"
    assert_close(pen, pen_u, rtol=1e-10, name="penalty")
    assert_close(grad, grad_u, rtol=1e-9, atol=1e-12, name="d penalty / d z_S")


def test_hessian_vector_product_matches_finite_differences():
    zs, zt, M = _kd_problem(2, 4, 5)
    v = torch.randn(zs.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def grad_s(z):
        return gradient(lambda s: sk.sinkhorn_kd_loss(s, zt, M, eps=0.2, **CONVERGED), z)

    s = zs.clone().requires_grad_(True)
    g, = torch.autograd.grad(sk.sinkhorn_kd_loss(s, zt, M, eps=0.2, **CONVERGED), s,
                             create_graph=True)
    hv, = torch.autograd.grad((g * v).sum(), s)
    assert_close(g, grad_s(zs), atol=1e-12, name="first derivative")
    assert_close(hv, directional_difference(grad_s, zs, v, h=1e-5), atol=1e-8, name="H v")


def test_second_derivative_w_r_t_cost_and_teacher():
    zs, zt, M = _kd_problem(2, 3, 4)
    V = torch.randn(M.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))

    def grad_c(c):
        return gradient(lambda x: sk.sinkhorn_kd_loss(zs, zt, x, eps=0.3, **CONVERGED), c)

    t, c = zt.clone().requires_grad_(True), M.clone().requires_grad_(True)
    gt, gc = torch.autograd.grad(sk.sinkhorn_kd_loss(zs, t, c, eps=0.3, **CONVERGED), (t, c),
                                 create_graph=True)
    assert gt.requires_grad and gc.requires_grad
    hc, = torch.autograd.grad((gc * V).sum(), c)   # d<T, V>/dM: (dT/dM) V
    assert hc.abs().max() > 1e-2
    assert_close(hc, directional_difference(grad_c, M, V, h=1e-5), atol=1e-7, name="H_M V")


# ---- the module ----------------------------------------------------------------------------------

@pytest.mark.parametrize("with_target", [False, True])
def test_module_matches_functional(with_target):
    zs, zt, M = _kd_problem(6, 4, 5)
    crit = sk.SinkhornKDLoss(M, tau=3.0, eps=0.1, weight=10.0, n_iters=60)
    y = torch.tensor([0, 1, 2, 3, 4, 0]) if with_target else None
    s = zs.clone().requires_grad_(True)
    loss = crit(s, zt, y)
    expected = 10.0 * sk.sinkhorn_kd_loss(zs, zt, M, tau=3.0, eps=0.1, n_iters=60)
    if with_target:
        expected = expected + F.cross_entropy(zs, y)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert s.grad is not None and crit.last_iters.shape == (6,)
    assert "C_T=4, C_S=5" in repr(crit)


def test_module_with_unrolled_gradient():
    zs, zt, M = _kd_problem(3, 4, 5)
    grads = []
    for mode in ("unrolled", "envelope"):
        crit = sk.SinkhornKDLoss(M, eps=0.2, weight=2.0, n_iters=4, grad=mode, backend="torch")
        s = zs.clone().requires_grad_(True)
        crit(s, zt).backward()
        grads.append(s.grad)
    s = zs.clone().requires_grad_(True)
    (2.0 * sk.sinkhorn_kd_loss(s, zt, M, eps=0.2, n_iters=4, grad="unrolled")).backward()
    torch.testing.assert_close(grads[0], s.grad)
    # 4 iterations: far from converged, so the module really took the unrolled path
    assert (grads[0] - grads[1]).abs().max() > 1e-6


def test_module_targets():
    zs, zt, M = _kd_problem(3, 4, 5)
    crit = sk.SinkhornKDLoss(M, n_iters=20)
    y = torch.tensor([0, 4, 2])
    want = crit(zs, zt, y)
    torch.testing.assert_close(crit(zs, zt, y.to(torch.int8)), want)   # any integer dtype
    torch.testing.assert_close(crit(zs, zt, y.to(torch.uint8)), want)
    for bad in ([0, 5, 2], [-1, 0, 0]):
        with pytest.raises(ValueError, match=r"^target must lie in \[0, 5\)"):
            crit(zs, zt, torch.tensor(bad))


def test_module_trains_a_student():
    # a cross-task student whose classes map one-to-one to a subset of the teacher's: the loss
    # must pull it toward the teacher's structure
    torch.manual_seed(0)
    C_T, C_S, d = 6, 3, 8
    M = torch.ones(C_T, C_S)
    M[[1, 3, 5], [0, 1, 2]] = 0.0
    x = torch.randn(64, d)
    zt = torch.zeros(64, C_T)
    zt[torch.arange(64), torch.tensor([1, 3, 5] * 21 + [1])] = 6.0
    student = torch.nn.Linear(d, C_S)
    crit = sk.SinkhornKDLoss(M, tau=1.0, eps=0.1, weight=1.0, n_iters=50)
    opt = torch.optim.Adam(student.parameters(), lr=0.05)
    first = None
    for _ in range(60):
        loss = crit(student(x), zt)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
