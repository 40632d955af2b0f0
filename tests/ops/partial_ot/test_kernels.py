"""Compiled partial-OT backends (C++ CPU, Triton; Triton through TRITON_INTERPRET=1 without a GPU)
against the PyTorch reference: coupling, fused open-set loss, gradients."""

import pytest
import torch

import selkd_kernels as sk
from selkd_kernels.ops.partial_ot import reference as R

# the package exports a function named partial_ot, which shadows the submodule attribute
from selkd_kernels.ops.partial_ot import dispatch as PO  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = [b for b in ("cpp", "triton") if b in sk.available_partial_ot_backends(DEVICE)]
if not KERNELS:
    pytest.skip("no compiled partial-OT backend here", allow_module_level=True)

SHAPES = [(1, 1), (1, 4), (5, 1), (7, 3), (13, 6), (33, 21)]
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-5), torch.float64: dict(rtol=1e-10, atol=1e-11)}


def _scores(m, k, dtype, seed, scale=3.0, noncontig=False):
    g = torch.Generator().manual_seed(seed)
    if noncontig:
        z = (torch.randn(k, m, generator=g, dtype=torch.float64) * scale).t()
    else:
        z = torch.randn(m, k, generator=g, dtype=torch.float64) * scale
    z = z.to(dtype).to(DEVICE)
    assert z.is_contiguous() != noncontig or (m == 1 or k == 1)
    return z


def _gammas(m):
    return sorted({min(m, max(0.05, g)) for g in (0.05, 0.45 * m, m - 0.3, float(m))})


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["exact", "bregman"])
@pytest.mark.parametrize("m,k", SHAPES)
def test_coupling_matches_reference(backend, dtype, method, m, k):
    be = PO.get_backend(backend, torch.device(DEVICE))
    for i, gamma in enumerate(_gammas(m)):
        z = _scores(m, k, dtype, seed=m * 31 + k + i, noncontig=(i % 2 == 1))
        log_p, l, rho, sat = be.coupling(z, gamma=gamma, eps=0.7, method=method, n_iters=5)
        want, rho_r, sat_r = R.log_coupling(z.double(), gamma, 0.7, method, 5)
        torch.testing.assert_close(log_p.double(), want, **TOL[dtype])
        torch.testing.assert_close(rho.double(), rho_r, **TOL[dtype])
        if method == "exact" and dtype == torch.float64:
            assert torch.equal(sat.cpu(), sat_r.cpu())
        if dtype == torch.float64:
            P = torch.exp(log_p)
            assert abs(P.sum().item() - gamma) < 1e-9 * max(gamma, 1)
            if method == "exact":
                assert (P.sum(1) <= 1 + 1e-12).all()


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["exact", "bregman"])
@pytest.mark.parametrize("m,k", [(1, 1), (6, 2), (17, 5), (40, 21)])
def test_fused_loss_and_gradient_match_reference(backend, dtype, method, m, k):
    be = PO.get_backend(backend, torch.device(DEVICE))
    for i, gamma in enumerate(_gammas(m)[:2] if m > 1 else [0.6]):
        zs = _scores(m, k, dtype, seed=7 + i, noncontig=(i == 1))
        zt = _scores(m, k, dtype, seed=70 + i, scale=5.0)
        y = torch.randint(0, k, (m,), generator=torch.Generator().manual_seed(i)).to(DEVICE)
        loss, grad = be.loss_forward(zs, zt, y, gamma=gamma, eps=0.8, lam=1.5, method=method, n_iters=4)
        z64 = zs.double().detach().requires_grad_()
        want = R.open_set_loss(z64, zt.double(), y, gamma, 0.8, 1.5, method, 4)
        (g_want,) = torch.autograd.grad(want, z64)
        torch.testing.assert_close(loss.double(), want.detach(), **TOL[dtype])
        torch.testing.assert_close(grad.double(), g_want, **TOL[dtype])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("method", ["exact", "bregman"])
def test_public_api_backward_matches_reference(backend, method):
    torch.manual_seed(0)
    z = torch.randn(11, 5, dtype=torch.float64, device=DEVICE) * 2
    w = torch.randn(11, 5, dtype=torch.float64, device=DEVICE)
    grads = {}
    for be in ("torch", backend):
        zz = z.clone().requires_grad_()
        log_p = sk.partial_ot(zz, 4.5, eps=0.6, method=method, n_iters=6, backend=be, log=True)
        ((w * log_p).sum() + (w * log_p.exp()).sum()).backward()
        grads[be] = zz.grad
    torch.testing.assert_close(grads[backend], grads["torch"], rtol=1e-10, atol=1e-11)


def test_cpp_gradcheck_and_noncontiguous():
    if "cpp" not in KERNELS:
        pytest.skip("C++ extension not built")
    torch.manual_seed(1)
    z = (torch.randn(5, 7, dtype=torch.float64) * 2).t()[:, :4].requires_grad_()  # (7, 4) strided
    for method in ("exact", "bregman"):
        f = lambda x: sk.partial_ot(x, 3.1, eps=0.9, method=method, n_iters=5,  # noqa: E731
                                    backend="cpp", log=True).sin().sum()
        assert torch.autograd.gradcheck(f, (z,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", KERNELS)
def test_extreme_scores_finite(backend):
    be = PO.get_backend(backend, torch.device(DEVICE))
    torch.manual_seed(2)
    for scale, eps in [(1e4, 1e-2), (1e-9, 1.0)]:
        z = (torch.randn(9, 4, dtype=torch.float64) * scale).to(DEVICE)
        for method in ("exact", "bregman"):
            log_p, _, _, _ = be.coupling(z, gamma=3.5, eps=eps, method=method, n_iters=5)
            want, _, _ = R.log_coupling(z, 3.5, eps, method, 5)
            assert torch.isfinite(log_p).all()
            torch.testing.assert_close(log_p, want, rtol=1e-10, atol=1e-8)


@pytest.mark.parametrize("backend", KERNELS)
def test_half_inputs_accepted(backend):
    z = torch.randn(6, 3, device=DEVICE).to(torch.float16)
    P = sk.partial_ot(z, 2.0, backend=backend)
    assert P.dtype == torch.float16
    torch.testing.assert_close(P.float(), sk.partial_ot(z.float(), 2.0, backend="torch"),
                               rtol=2e-3, atol=2e-3)


def test_auto_backend_choice():
    be = PO.get_backend("auto", torch.device("cpu"))
    assert be.name == ("cpp" if "cpp" in sk.available_partial_ot_backends("cpu") else "torch")


def test_triton_row_limit():
    if "triton" not in sk.available_partial_ot_backends(DEVICE):
        pytest.skip("Triton backend not available")
    limit = PO.get_backend("triton", torch.device(DEVICE)).max_rows
    with pytest.raises(ValueError, match="scores"):
        sk.partial_ot(torch.randn(limit + 1, 3, device=DEVICE), 2.0, backend="triton")
    be = PO.get_backend("auto", torch.device(DEVICE), limit + 1)
    assert be.name != "triton"


def test_cpp_fake_kernels_give_shapes():
    if "cpp" not in KERNELS:
        pytest.skip("C++ extension not built")
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        z = torch.empty(9, 4, dtype=torch.float64)
        y = torch.zeros(9, dtype=torch.long)
        log_p, l, rho, sat = torch.ops.selkd.partial_ot_coupling(z, 2.0, 1.0, 0, 10)
        loss, grad = torch.ops.selkd.partial_ot_loss(z, z, y, 2.0, 1.0, 1.0, 1, 10)
    assert log_p.shape == (9, 4) and l.shape == rho.shape == sat.shape == (9,)
    assert sat.dtype == torch.bool and loss.shape == () and grad.shape == (9, 4)
