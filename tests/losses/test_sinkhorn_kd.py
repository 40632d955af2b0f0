"""Sinkhorn KD loss: values, envelope gradients (docs/ops/sinkhorn.md) and the nn.Module (docs/losses.md)."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import selkd_kernels as sk

@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    # this module tests the torch reference: "auto" must not route to a compiled backend
    monkeypatch.setenv("SELKD_BACKEND", "torch")


warnings.filterwarnings("ignore", message="selkd_kernels: backend")

CONVERGED = dict(n_iters=20000, tol=1e-14, backend="torch")


def _logits(B, C_T, C_S, dtype=torch.float64, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    zs = scale * torch.randn(B, C_S, generator=g, dtype=torch.float64)
    zt = scale * torch.randn(B, C_T, generator=g, dtype=torch.float64)
    M = torch.rand(C_T, C_S, generator=g, dtype=torch.float64)
    return zs.to(dtype), zt.to(dtype), M.to(dtype)


def _central_diff(f, x, h=1e-5):
    g = torch.zeros_like(x)
    flat, gf = x.view(-1), g.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        flat[i] = old + h
        fp = f().item()
        flat[i] = old - h
        fm = f().item()
        flat[i] = old
        gf[i] = (fp - fm) / (2 * h)
    return g


@pytest.mark.parametrize("B,C_T,C_S,tau,eps", [(1, 1, 3, 3.0, 0.1), (2, 5, 3, 3.0, 0.1),
                                               (2, 4, 7, 1.0, 0.5), (1, 6, 1, 1.0, 0.5)])
def test_envelope_gradients_match_finite_differences(B, C_T, C_S, tau, eps):
    zs, zt, M = _logits(B, C_T, C_S)
    zs.requires_grad_(True)
    zt.requires_grad_(True)
    M.requires_grad_(True)
    loss = sk.sinkhorn_kd_loss(zs, zt, M, tau=tau, eps=eps, reduction="sum", **CONVERGED)
    loss.backward()

    def f():
        with torch.no_grad():
            return sk.sinkhorn_kd_loss(zs, zt, M, tau=tau, eps=eps, reduction="sum", **CONVERGED)

    for x in (zs, zt, M):
        fd = _central_diff(f, x.data)
        assert (x.grad - fd).abs().max() < 1e-6, (x.grad, fd)


def test_envelope_matches_unrolled_gradient_at_convergence():
    zs, zt, M = _logits(3, 5, 4)
    grads = {}
    for mode, n in (("envelope", 3000), ("unrolled", 3000)):
        s, t, c = (x.clone().requires_grad_(True) for x in (zs, zt, M))
        sk.sinkhorn_kd_loss(s, t, c, eps=0.2, n_iters=n, grad=mode, backend="torch").backward()
        grads[mode] = (s.grad, t.grad, c.grad)
    for ge, gu in zip(grads["envelope"], grads["unrolled"]):
        torch.testing.assert_close(ge, gu, rtol=1e-8, atol=1e-10)


def test_unrolled_differs_before_convergence():
    # a test that could not fail would be worthless: with 2 iterations the two gradients differ
    zs, zt, M = _logits(2, 5, 4)
    out = []
    for mode in ("envelope", "unrolled"):
        s = zs.clone().requires_grad_(True)
        sk.sinkhorn_kd_loss(s, zt, M, eps=0.05, n_iters=2, grad=mode).backward()
        out.append(s.grad)
    assert (out[0] - out[1]).abs().max() > 1e-4


def test_loss_equals_sinkhorn_of_softmaxes():
    zs, zt, M = _logits(4, 6, 5)
    rows = sk.sinkhorn_kd_loss(zs, zt, M, tau=2.0, eps=0.1, n_iters=77, reduction="none")
    r = sk.sinkhorn(torch.softmax(zt / 2, -1), torch.softmax(zs / 2, -1), M, eps=0.1, n_iters=77)
    torch.testing.assert_close(rows, r.loss)
    torch.testing.assert_close(sk.sinkhorn_kd_loss(zs, zt, M, tau=2.0, eps=0.1, n_iters=77,
                                                   reduction="mean"), rows.mean())
    torch.testing.assert_close(sk.sinkhorn_kd_loss(zs, zt, M, tau=2.0, eps=0.1, n_iters=77,
                                                   reduction="sum"), rows.sum())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_grad_output_scales_gradients(reduction):
    zs, zt, M = _logits(5, 4, 6)
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
    zs, zt, M = _logits(3, 4, 5)
    s = zs.clone().requires_grad_(True)
    sk.sinkhorn_kd_loss(s, zt, M).backward()
    assert zt.grad is None and M.grad is None and s.grad is not None


def test_per_row_cost_gradient():
    zs, zt, _ = _logits(3, 4, 5)
    M = torch.rand(3, 4, 5, dtype=torch.float64, requires_grad=True)
    loss = sk.sinkhorn_kd_loss(zs, zt, M, n_iters=40, reduction="sum")
    loss.backward()
    r = sk.sinkhorn(torch.softmax(zt / 3, -1), torch.softmax(zs / 3, -1), M.detach(), eps=0.1,
                    n_iters=40, return_plan=True)
    torch.testing.assert_close(M.grad, r.plan)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precision_logits(dtype):
    zs, zt, M = _logits(4, 6, 5, dtype=dtype)
    s = zs.clone().requires_grad_(True)
    loss = sk.sinkhorn_kd_loss(s, zt, M, n_iters=60)
    loss.backward()
    assert loss.dtype == dtype and s.grad.dtype == dtype
    ref = sk.sinkhorn_kd_loss(zs.double(), zt.double(), M.double(), n_iters=60)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.double().item() - ref.item()) <= tol * max(1.0, abs(ref.item()))


def test_nan_logits_never_give_finite_loss():
    zs, zt, M = _logits(3, 4, 5)
    zs[1, 2] = float("nan")
    s = zs.clone().requires_grad_(True)
    loss = sk.sinkhorn_kd_loss(s, zt, M)
    assert torch.isnan(loss)
    zt2 = zt.clone()
    zt2[0, 0] = float("inf")
    assert torch.isnan(sk.sinkhorn_kd_loss(zs.nan_to_num(0.0), zt2, M))


def test_return_stats():
    zs, zt, M = _logits(3, 4, 5)
    loss, (iters, err) = sk.sinkhorn_kd_loss(zs, zt, M, n_iters=500, tol=1e-8, return_stats=True)
    assert iters.shape == (3,) and (iters <= 500).all() and (err <= 1e-8).all()


@pytest.mark.parametrize("with_target", [False, True])
def test_module_matches_functional(with_target):
    zs, zt, M = _logits(6, 4, 5)
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
