"""torch.compile(fullgraph=True) traces a whole training step that uses the cpp backend.

The ops carry fake kernels (selkd_kernels/ops/sinkhorn/cpp.py) and the loss's autograd.Function only
scales stored gradients in backward, so Dynamo sees no graph break: forward, backward and the
parameter update compile into one program. PyTorch's own optimizers insert a deliberate graph
break in ``step()`` (torch/optim/optimizer.py, ``_use_grad``), so the step here updates parameters
by hand; ``Tensor.backward()`` inside a compiled region needs ``trace_autograd_ops``. Gradients
are cleared outside the compiled step, as ``optimizer.zero_grad()`` usually is: assigning
``p.grad = None`` inside the traced step was not honoured by Dynamo here (torch 2.13: the next
call's gradients accumulated onto the previous ones).
"""
import pytest
import torch

import selkd_kernels as sk

pytest.importorskip("selkd_kernels.ops.sinkhorn.cpp", reason="C++ extension selkd_kernels._C not built")


def _make(seed=0):
    g = torch.Generator().manual_seed(seed)
    student = torch.nn.Linear(6, 10)
    with torch.no_grad():
        for p in student.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(16, 6, generator=g)
    z_t = 2 * torch.randn(16, 12, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    cost = torch.rand(12, 10, generator=g)
    return student, x, z_t, y, cost


def _train_step(student, x, z_t, y, cost, lr=0.5):
    loss = torch.nn.functional.cross_entropy(student(x), y) + 10.0 * sk.sinkhorn_kd_loss(
        student(x), z_t, cost, tau=3.0, eps=0.1, n_iters=30, tol=1e-6, check_every=5,
        backend="cpp")
    loss.backward()
    with torch.no_grad():
        for p in student.parameters():
            p -= lr * p.grad
    return loss.detach()


def test_fullgraph_training_step_matches_eager():
    torch._dynamo.reset()
    eager_model, x, z_t, y, cost = _make()
    comp_model, *_ = _make()
    compiled = torch.compile(_train_step, fullgraph=True)
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for _ in range(3):
            eager_model.zero_grad(set_to_none=True)
            comp_model.zero_grad(set_to_none=True)
            l_e = _train_step(eager_model, x, z_t, y, cost)
            l_c = compiled(comp_model, x, z_t, y, cost)
            torch.testing.assert_close(l_c, l_e, rtol=1e-5, atol=1e-6)
    for p_c, p_e in zip(comp_model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p_c, p_e, rtol=1e-5, atol=1e-6)
    # the step really moved the student, so the comparison above is not vacuous
    fresh, *_ = _make()
    assert (comp_model.weight - fresh.weight).abs().max() > 1e-3


def test_fullgraph_forward_with_teacher_and_cost_gradients():
    # the non-default gradient paths (teacher logits, per-row cost) also trace without breaks
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(1)
    z_s = torch.randn(4, 5, generator=g, requires_grad=True)
    z_t = torch.randn(4, 6, generator=g, requires_grad=True)
    cost = torch.rand(4, 6, 5, generator=g, requires_grad=True)

    def f(z_s, z_t, cost):
        return sk.sinkhorn_kd_loss(z_s, z_t, cost, eps=0.2, n_iters=20, backend="cpp")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    want = torch.autograd.grad(f(z_s, z_t, cost), (z_s, z_t, cost))
    got = torch.autograd.grad(compiled(z_s, z_t, cost), (z_s, z_t, cost))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
