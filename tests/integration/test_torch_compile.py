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
import functools

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


# ---- every KD-family loss, fullgraph=True and dynamic=True -------------------------------------

def _losses():
    g = torch.Generator().manual_seed(3)
    M1, M2 = torch.rand(12, 10, generator=g), torch.rand(7, 10, generator=g)
    return {
        "kd-cpp": (sk.SinkhornKDLoss(M1, n_iters=30, tol=1e-6, check_every=5, backend="cpp"), 1),
        "kd-torch": (sk.SinkhornKDLoss(M1, n_iters=30, tol=1e-6, check_every=5,
                                       backend="torch"), 1),
        "multi-teacher": (sk.MultiTeacherSinkhornKDLoss([M1, M2], weights=[0.7, 0.3],
                                                        n_iters=30), 2),
        "closed-selkd": (sk.SelKDLoss([0, 2, 3, 5, 6, 7, 8, 9, 10, 11]), 1),
    }


def _teachers(k, B, g):
    return [2 * torch.randn(B, 12, generator=g), 2 * torch.randn(B, 7, generator=g)][:k]


def _loss_step(crit, k, model, x, z_ts, y, lr=0.5):
    loss = crit(model(x), z_ts if k > 1 else z_ts[0], y)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return loss.detach()


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("name", ["kd-cpp", "kd-torch", "multi-teacher",
                                  "closed-selkd"])
def test_training_step_of_every_loss_compiles(name, dynamic):
    from selkd_kernels.apps.training import MLP
    torch._dynamo.reset()
    crit, k = _losses()[name]
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 6, generator=g)
    z_ts = _teachers(k, 16, g)
    y = torch.randint(0, 12 if name == "closed-selkd" else 10, (16,), generator=g)
    if name == "closed-selkd":
        y = torch.tensor([0, 2, 3, 5, 6, 7, 8, 9, 10, 11] * 2)[:16]
    models = []
    for _ in range(2):
        torch.manual_seed(5)
        models.append(MLP(6, [8], 10))
    step = torch.compile(functools.partial(_loss_step, crit, k), fullgraph=True, dynamic=dynamic,
                         backend="aot_eager")
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        for _ in range(2):
            for m in models:
                m.zero_grad(set_to_none=True)
            want = _loss_step(crit, k, models[0], x, z_ts, y)
            got = step(models[1], x, z_ts, y)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if dynamic:  # another batch size runs through the dynamic-shape graph
            models[1].zero_grad(set_to_none=True)
            step(models[1], x[:12], [z[:12] for z in z_ts], y[:12])
    if not dynamic:
        for p_c, p_e in zip(models[1].parameters(), models[0].parameters()):
            torch.testing.assert_close(p_c, p_e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_sinkhorn_with_marginal_check_compiles_and_gives_nan_for_rejected_rows(backend):
    # eagerly the check raises ValueError; traced it cannot, so a failing row's loss is NaN
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(6)
    a = torch.softmax(torch.randn(4, 5, generator=g), -1)
    b = torch.softmax(torch.randn(4, 3, generator=g), -1)
    M = torch.rand(5, 3, generator=g, requires_grad=True)

    def f(a, b, M):
        return sk.sinkhorn(a, b, M, eps=0.2, n_iters=30, tol=1e-6, backend=backend)

    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend="aot_eager")
    got, want = compiled(a, b, M), f(a, b, M)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    got.loss.sum().backward()
    assert torch.isfinite(M.grad).all()
    bad = b.clone()
    bad[2] *= 1.5
    bad[3, 0] = -0.1
    with pytest.raises(ValueError, match="^b must"):
        f(a, bad, M)
    out = compiled(a, bad, M)
    assert torch.isnan(out.loss[2:]).all() and torch.isfinite(out.loss[:2]).all()
    assert torch.equal(out.loss[:2], compiled(a, b, M).loss[:2])
