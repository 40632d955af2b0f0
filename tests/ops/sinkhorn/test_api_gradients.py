"""Gradients of ``sk.sinkhorn`` (selkd_kernels/ops/sinkhorn/api.py): the envelope gradients
``dS/da = alpha``, ``dS/db = beta``, ``dS/dM = T`` on every backend, against finite differences in
float64, against each other, and under ``create_graph=True``."""
import warnings

import pytest
import torch

import selkd_kernels as sk
from selkd_kernels.ops.sinkhorn.dispatch import REGISTRY
from tests.utils import (assert_close, central_difference_at, directional_difference, logits,
                         ot_problem, random_coordinates, require_backend)

warnings.filterwarnings("ignore", message="selkd_kernels")
CONVERGED = dict(eps=0.2, n_iters=20000, tol=1e-14)
BACKENDS = ["torch", "cpp", "triton"]


def _loss(a, b, M, backend="torch", **kw):
    opts = dict(CONVERGED, **kw)
    return sk.sinkhorn(a, b, M, backend=backend, check_marginals=False, **opts).loss


def test_issue_repro_cost_gradient_on_every_backend():
    # the issue's repro: backward used to leave cost.grad None on the cpp backend
    for name in BACKENDS:
        if name != "torch":
            require_backend(REGISTRY, name)
        c = torch.rand(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
        out = sk.sinkhorn(torch.full((2, 3), 1 / 3), torch.full((2, 4), 0.25), c, backend=name,
                          n_iters=500, tol=1e-7)
        out.loss.sum().backward()
        # dS/dM = T and each row's plan carries mass 1
        assert c.grad is not None and abs(float(c.grad.sum()) - 2.0) < 1e-5, name


@pytest.mark.parametrize("per_row", [False, True])
def test_gradients_match_finite_differences_through_softmax(per_row):
    # a = softmax(x), b = softmax(y): every perturbation stays balanced, so S is differentiable
    # and a central difference measures its true derivative
    B, m, n = 2, 4, 5
    x, y = logits(B, m, seed=3, scale=1.0), logits(B, n, seed=4, scale=1.0)
    _, _, M = ot_problem(B, m, n, per_row=per_row)
    w = torch.tensor([0.7, -1.3], dtype=torch.float64)

    def f(x, y, M):
        return (_loss(torch.softmax(x, -1), torch.softmax(y, -1), M) * w).sum()

    xs, ys, Ms = (t.clone().requires_grad_(True) for t in (x, y, M))
    f(xs, ys, Ms).backward()
    for name, var, grad in (("x", x, xs.grad), ("y", y, ys.grad), ("cost", M, Ms.grad)):
        idx = random_coordinates(var, 6, seed=1)
        fd = central_difference_at(lambda v: f(*(v if t is var else t for t in (x, y, M))),
                                   var, idx)
        assert_close(grad.flatten()[idx], fd, atol=1e-7, name=f"d/d{name}")


def test_marginal_gradient_is_exact_for_balanced_mass_changes():
    # (da, db) with sum da = sum db != 0 changes the total mass: only a gradient of the form
    # (alpha + c, beta - c) predicts it; centring alpha and beta separately would not
    a, b, M = ot_problem(1, 4, 3)
    g = torch.Generator().manual_seed(5)
    da, db = torch.rand(1, 4, dtype=torch.float64, generator=g), torch.rand(
        1, 3, dtype=torch.float64, generator=g)
    db = db * da.sum() / db.sum()
    a_, b_ = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    _loss(a_, b_, M).sum().backward()
    predicted = (a_.grad * da).sum() + (b_.grad * db).sum()
    t = torch.tensor(0.0, dtype=torch.float64)
    fd = directional_difference(lambda s: _loss(a + s * da, b + s * db, M).sum(), t,
                                torch.tensor(1.0, dtype=torch.float64), h=1e-6)
    assert_close(predicted, fd, atol=1e-8, name="directional derivative")
    r = sk.sinkhorn(a, b, M, **CONVERGED)
    assert_close(a_.grad, r.alpha, rtol=1e-13, name="dS/da = alpha")
    assert_close(b_.grad, r.beta, rtol=1e-13, name="dS/db = beta")


@pytest.mark.parametrize("name", ["cpp", "triton"])
@pytest.mark.parametrize("per_row", [False, True])
def test_compiled_backends_give_the_torch_gradients(name, per_row):
    require_backend(REGISTRY, name)
    a, b, M = ot_problem(3, 5, 4, per_row=per_row, zeros=True)
    grads = {}
    for be in ("torch", name):
        vs = [t.clone().requires_grad_(True) for t in (a, b, M)]
        w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
        (_loss(*vs, backend=be, n_iters=60, tol=None) * w).sum().backward()
        grads[be] = [v.grad for v in vs]
    for want, got, what in zip(grads["torch"], grads[name], ("a", "b", "cost")):
        assert_close(got, want, rtol=1e-9, atol=1e-10, name=f"{name} d/d{what}")


def test_zero_masses_get_zero_gradient_and_nan_rows_nan():
    a, b, M = ot_problem(3, 5, 4, zeros=True)
    a[2, 1] = float("nan")
    vs = [t.clone().requires_grad_(True) for t in (a, b, M)]
    sk.sinkhorn(*vs, eps=0.2, n_iters=50, check_marginals=False).loss.sum().backward()
    ga, gb, gc = (v.grad for v in vs)
    assert (ga[:2][a[:2] == 0] == 0).all() and (gb[:2][b[:2] == 0] == 0).all()
    assert torch.isfinite(ga[:2]).all() and torch.isfinite(gb[:2]).all()
    assert torch.isnan(ga[2][a[2] > 0]).all() and torch.isnan(gb[2][b[2] > 0]).all()
    assert torch.isnan(gc).all(), "a NaN row must poison the shared cost's gradient"


def test_second_derivative_through_sinkhorn():
    # create_graph=True differentiates the reference iterations: the Hessian-vector product
    # matches a central difference of the (envelope) gradient at convergence
    x, y = logits(2, 4, seed=6, scale=1.0), logits(2, 3, seed=7, scale=1.0)
    _, _, M = ot_problem(2, 4, 3)

    def grad_x(x):
        xs = x.clone().requires_grad_(True)
        return torch.autograd.grad(_loss(torch.softmax(xs, -1), torch.softmax(y, -1), M).sum(),
                                   xs)[0]

    v = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    xs = x.clone().requires_grad_(True)
    g, = torch.autograd.grad(_loss(torch.softmax(xs, -1), torch.softmax(y, -1), M).sum(), xs,
                             create_graph=True)
    assert g.requires_grad, "the gradient must carry a graph under create_graph=True"
    hv, = torch.autograd.grad((g * v).sum(), xs)
    assert hv.abs().max() > 1e-3, "a zero Hessian-vector product would test nothing"
    assert_close(hv, directional_difference(grad_x, x, v, h=1e-5), atol=1e-7, name="H v")
    assert_close(g, grad_x(x), atol=1e-10, name="first derivative")


def test_unrolled_gradients_reach_every_output():
    a, b, M = ot_problem(2, 4, 3)
    Ms = M.clone().requires_grad_(True)
    r = sk.sinkhorn(a, b, Ms, grad="unrolled", return_plan=True, **CONVERGED)
    assert r.alpha.requires_grad and r.plan.requires_grad
    r.loss.sum().backward()
    env = M.clone().requires_grad_(True)
    e = sk.sinkhorn(a, b, env, return_plan=True, **CONVERGED)
    assert not e.alpha.requires_grad and not e.plan.requires_grad  # documented: loss only
    e.loss.sum().backward()
    assert_close(Ms.grad, env.grad, atol=1e-10, name="unrolled vs envelope at convergence")
    with pytest.raises(ValueError, match="grad='unrolled'"):
        sk.sinkhorn(a, b, M, grad="unrolled", backend="cpp")
    with pytest.raises(ValueError, match="grad"):
        sk.sinkhorn(a, b, M, grad="implicit")


@pytest.mark.parametrize("name", BACKENDS)
def test_row_without_mass_has_zero_gradients(name):
    if name != "torch":
        require_backend(REGISTRY, name)
    a, b, M = ot_problem(3, 4, 5)
    a[1], b[1] = 0.0, 0.0
    vs = [t.clone().requires_grad_(True) for t in (a, b, M)]
    out = sk.sinkhorn(*vs, eps=0.2, n_iters=20, backend=name)
    assert out.loss[1] == 0
    (out.loss * torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)).sum().backward()
    assert (vs[0].grad[1] == 0).all() and (vs[1].grad[1] == 0).all()
    keep = [0, 2]
    ws = [t.clone().requires_grad_(True) for t in (a[keep], b[keep], M)]
    sk.sinkhorn(*ws, eps=0.2, n_iters=20, backend=name).loss.sum().backward()
    assert_close(vs[2].grad, ws[2].grad, rtol=1e-12, atol=1e-14, name="cost gradient")
