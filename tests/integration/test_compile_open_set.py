"""torch.compile(fullgraph=True, dynamic=True) traces open-set SelKD: the coupling and a training
step with the open-set loss, both formulations, on the torch reference and the C++ backend.

The torch partial-OT path is written with tensor operations only (no ``.item()``, no branch on
values): the exact active set comes from a stable sort and ``argmax``, ``gamma="labels"`` stays a
device tensor, and the label checks that read values are skipped while tracing. The C++ ops take
``gamma`` as a tensor and carry fake kernels. The step updates parameters by hand because
PyTorch's optimizers break the graph in ``step()`` (see test_torch_compile.py).
"""
import pytest
import torch

from torch._dynamo.testing import CompileCounterWithBackend

import selkd_kernels as sk

BACKENDS = ["torch"] + (["cpp"] if "cpp" in sk.available_partial_ot_backends("cpu") else [])
SEL = [1, 4, 6]


def _make(seed, formulation):
    g = torch.Generator().manual_seed(seed)
    cols = len(SEL) + (1 if formulation == "paper" else 0)
    student = torch.nn.Linear(5, cols)
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return student, g


def _batch(g, m):
    x = torch.randn(m, 5, generator=g)
    z_t = 2 * torch.randn(m, 8, generator=g)
    y = torch.randint(0, 8, (m,), generator=g)
    y[0] = SEL[0]  # at least one selected sample
    return x, z_t, y


def _step(student, x, z_t, y, crit, lr=0.3):
    loss = crit(student(x), z_t, y)
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            p -= lr * p.grad
    return loss.detach()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("formulation", ["paper", "consistent"])
def test_open_set_training_step_fullgraph_dynamic(backend, formulation):
    torch._dynamo.reset()
    crit = sk.SelKDLoss(SEL, open_set=True, formulation=formulation, eps=0.8, weight=1.5,
                        backend=backend)
    eager, g = _make(0, formulation)
    comp, _ = _make(0, formulation)
    counter = CompileCounterWithBackend("aot_eager")
    step = torch.compile(_step, fullgraph=True, dynamic=True, backend=counter)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        frames = []
        for m in (12, 9, 16):  # new batch sizes: no data-dependent guard, no recompilation
            x, z_t, y = _batch(g, m)
            eager.zero_grad(set_to_none=True)
            comp.zero_grad(set_to_none=True)
            l_e = _step(eager, x, z_t, y, crit)
            l_c = step(comp, x, z_t, y, crit)
            torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-6)
            frames.append(counter.frame_count)
    assert frames[0] == frames[-1]
    for p_c, p_e in zip(comp.parameters(), eager.parameters()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-5, atol=1e-6)
    fresh, _ = _make(0, formulation)
    assert (comp.weight - fresh.weight).abs().max() > 1e-3  # the steps really moved it


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["exact", "bregman"])
def test_coupling_fullgraph_dynamic_with_nan_rows(backend, method):
    torch._dynamo.reset()

    def f(z):
        return sk.partial_ot(z, 3.0, eps=0.7, method=method, n_iters=4, backend=backend,
                             log=True)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    frames = []
    for m in (7, 11):
        z = torch.randn(m, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
        z[2, 1] = float("nan")
        zc = z.clone().requires_grad_()
        ze = z.clone().requires_grad_()
        got, want = compiled(zc), f(ze)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
        w = torch.randn(m, 4, dtype=torch.float64)
        clean = [i for i in range(m) if i != 2]
        (g_c,) = torch.autograd.grad((w * got)[clean].sum(), zc)
        (g_e,) = torch.autograd.grad((w * want)[clean].sum(), ze)
        torch.testing.assert_close(g_c, g_e, rtol=1e-12, atol=1e-12, equal_nan=True)
        frames.append(counter.frame_count)
    assert frames[0] == frames[-1]
