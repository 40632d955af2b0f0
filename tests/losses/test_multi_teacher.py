"""Multi-teacher Sinkhorn KD (selkd_kernels/losses/multi_teacher.py): explicit ``weights=``,
targets, backends and second derivatives. The score-weighted path is tested with the assessment
(tests/assessment/test_score.py)."""
import pytest
import torch
import torch.nn.functional as F

import selkd_kernels as sk
from tests.utils import assert_close, cost, logits


@pytest.fixture(autouse=True)
def _reference_backend(monkeypatch):
    monkeypatch.setenv("SELKD_BACKEND", "torch")


def _teachers():
    zs = logits(4, 5, seed=0)
    zts = [logits(4, 3, seed=1), logits(4, 7, seed=2)]
    costs = [cost(3, 5, seed=3), cost(7, 5, seed=4)]
    return zs, zts, costs


def test_module_with_explicit_weights_is_the_weighted_sum():
    zs, zts, costs = _teachers()
    crit = sk.MultiTeacherSinkhornKDLoss(costs, weights=[0.25, 0.75], weight=4.0, eps=0.2,
                                         n_iters=40)
    y = torch.tensor([0, 4, 1, 3])
    s = zs.clone().requires_grad_(True)
    loss = crit(s, zts, y)
    terms = [sk.sinkhorn_kd_loss(zs, z, c, eps=0.2, n_iters=40) for z, c in zip(zts, costs)]
    want = 4.0 * (0.25 * terms[0] + 0.75 * terms[1]) + F.cross_entropy(zs, y)
    assert_close(loss, want, rtol=1e-12, name="loss")
    loss.backward()
    s2 = zs.clone().requires_grad_(True)
    (4.0 * (0.25 * sk.sinkhorn_kd_loss(s2, zts[0], costs[0], eps=0.2, n_iters=40)
            + 0.75 * sk.sinkhorn_kd_loss(s2, zts[1], costs[1], eps=0.2, n_iters=40))
     + F.cross_entropy(s2, y)).backward()
    assert_close(s.grad, s2.grad, rtol=1e-12, atol=1e-15, name="gradient")
    assert torch.equal(crit.teacher_weights, torch.tensor([0.25, 0.75]))


def test_zero_weight_skips_the_teacher():
    zs, zts, costs = _teachers()
    one = sk.MultiTeacherSinkhornKDLoss(costs, weights=[0.0, 1.0], weight=1.0, n_iters=30)
    bad = [torch.full_like(zts[0], float("nan")), zts[1]]   # never solved
    got = one(zs, bad)
    assert_close(got, sk.sinkhorn_kd_loss(zs, zts[1], costs[1], n_iters=30), rtol=1e-12,
                 name="loss")


def test_targets_and_constructor_arguments():
    zs, zts, costs = _teachers()
    crit = sk.MultiTeacherSinkhornKDLoss(costs, weights=[1.0, 1.0], n_iters=10)
    y = torch.tensor([0, 4, 1, 3])
    torch.testing.assert_close(crit(zs, zts, y.to(torch.int8)), crit(zs, zts, y))
    with pytest.raises(ValueError, match=r"^target must lie in \[0, 5\)"):
        crit(zs, zts, torch.tensor([0, 5, 1, 3]))
    with pytest.raises(ValueError, match="^backend"):
        sk.MultiTeacherSinkhornKDLoss(costs, weights=[1.0, 1.0], backend="bogus")
    with pytest.raises(ValueError, match="^weights"):
        sk.MultiTeacherSinkhornKDLoss(costs, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="^weights"):
        sk.MultiTeacherSinkhornKDLoss(costs, weights=[1.0])
    with pytest.raises(ValueError, match="^scores"):
        sk.MultiTeacherSinkhornKDLoss(costs, scores=[0.1, 0.2], weights=[1.0, 1.0])
    for name, value in (("tau", 1e-200), ("tau", 1e300), ("eps", 1e300)):
        with pytest.raises(ValueError, match=f"^{name} must lie in"):
            sk.MultiTeacherSinkhornKDLoss(costs, weights=[1.0, 1.0], **{name: value})
    # float64 can represent tau = 1e-45, float32 cannot: the call checks its compute dtype
    tiny = sk.MultiTeacherSinkhornKDLoss(costs, weights=[1.0, 1.0], tau=1e-45, n_iters=10)
    assert torch.isfinite(tiny(zs, zts))
    with pytest.raises(ValueError, match=r"^tau must lie in .* for float32"):
        tiny.float()(zs.float(), [z.float() for z in zts])


def test_second_derivative_is_kept():
    zs, zts, costs = _teachers()
    crit = sk.MultiTeacherSinkhornKDLoss(costs, weights=[0.5, 0.5], weight=1.0, eps=0.3,
                                         n_iters=2000, tol=1e-13)
    s = zs.clone().requires_grad_(True)
    g, = torch.autograd.grad(crit(s, zts), s, create_graph=True)
    h, = torch.autograd.grad((g ** 2).sum(), s)
    assert h.abs().max() > 1e-7
