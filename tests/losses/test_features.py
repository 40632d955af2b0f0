"""Feature-level distillation terms (FitNet, attention transfer, factor transfer) and their
composition with the logit losses (docs/selective_kd.md, "Feature terms")."""
import math

import pytest
import torch
import torch.nn.functional as F

import selkd_kernels as sk
from tests.utils import assert_close, generator


def _feat(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=generator(seed), dtype=torch.float64).to(dtype)


def _descends(loss_fn, x, lr=1e-3):
    x = x.detach().clone().requires_grad_()
    loss = loss_fn(x)
    (g,) = torch.autograd.grad(loss, x)
    assert g.abs().max() > 0
    with torch.no_grad():
        return float(loss_fn(x - lr * g)) < float(loss)


# ---- FitNet ----------------------------------------------------------------------------------

@pytest.mark.parametrize("shape_s,shape_t", [((6, 5), (6, 8)), ((4, 3, 5, 7), (4, 9, 5, 7))])
def test_fitnet_value_is_the_regressed_mse(shape_s, shape_t):
    s, t = _feat(*shape_s, seed=1), _feat(*shape_t, seed=2)
    W, b = _feat(shape_t[1], shape_s[1], seed=3), _feat(shape_t[1], seed=4)
    # the regressor applied at every position, written out with einsum
    hint = torch.einsum("dc,bc...->bd...", W, s) + b.view(1, -1, *([1] * (s.dim() - 2)))
    want = ((hint - t) ** 2).mean()
    assert_close(sk.fitnet_loss(s, t, W, b), want, rtol=1e-13, atol=1e-14, name="FitNet")


def test_fitnet_zero_on_identical_features_and_descends():
    s = _feat(5, 4, 3, 3, seed=5)
    eye = torch.eye(4, dtype=torch.float64)
    assert float(sk.fitnet_loss(s, s, eye)) == 0.0
    t = _feat(5, 6, 3, 3, seed=6)
    crit = sk.FitNetLoss(4, 6).double()
    assert _descends(lambda x: crit(x, t), s)
    # the regressor learns: one gradient step on its weight lowers the loss too
    loss = crit(s, t)
    loss.backward()
    with torch.no_grad():
        crit.weight -= 1e-3 * crit.weight.grad
    assert float(crit(s, t).detach()) < float(loss.detach())


def test_fitnet_gradcheck_and_teacher_is_detached():
    s = _feat(3, 2, seed=7).requires_grad_()
    t = _feat(3, 4, seed=8).requires_grad_()
    W = _feat(4, 2, seed=9).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, w: sk.fitnet_loss(a, t, w), (s, W))
    sk.fitnet_loss(s, t, W).backward()
    assert t.grad is None


def test_fitnet_bad_inputs():
    s, t = _feat(4, 3), _feat(4, 5)
    with pytest.raises(ValueError, match="weight"):
        sk.fitnet_loss(s, t, _feat(3, 5))
    with pytest.raises(ValueError, match="bias"):
        sk.fitnet_loss(s, t, _feat(5, 3), _feat(4))
    with pytest.raises(ValueError, match="teacher_features"):
        sk.fitnet_loss(s, _feat(3, 5), _feat(5, 3))
    with pytest.raises(ValueError, match="teacher_features"):
        sk.fitnet_loss(_feat(4, 3, 2, 2), _feat(4, 5, 3, 3), _feat(5, 3))
    with pytest.raises(ValueError, match="student_features"):
        sk.fitnet_loss(_feat(4, 3, 2), t, _feat(5, 3))
    with pytest.raises(ValueError, match="student_channels"):
        sk.FitNetLoss(0, 4)


# ---- attention transfer ----------------------------------------------------------------------

def test_attention_map_and_a_known_distance():
    f = _feat(2, 3, 4, 4, seed=10)
    a = (f ** 2).mean(1).flatten(1)
    assert_close(sk.attention_map(f), a / a.norm(dim=1, keepdim=True), rtol=1e-13,
                 name="attention map")
    # all attention on one position vs uniform attention over P positions: 2 - 2 / sqrt(P)
    s = torch.zeros(1, 2, 3, 3, dtype=torch.float64)
    s[0, :, 1, 2] = 1.0
    t = torch.ones(1, 5, 3, 3, dtype=torch.float64)
    want = 2 - 2 / math.sqrt(9)
    assert_close(sk.attention_transfer_loss(s, t), torch.tensor(want, dtype=torch.float64),
                 rtol=1e-13, name="AT")


def test_attention_transfer_zero_for_equal_attention_and_descends():
    t = _feat(4, 6, 5, 5, seed=11)
    assert float(sk.attention_transfer_loss(3 * t, t)) < 1e-30  # scale does not matter
    assert float(sk.attention_transfer_loss(-t, t)) < 1e-30    # nor the sign (|F|^2)
    s = _feat(4, 2, 5, 5, seed=12)
    crit = sk.AttentionTransferLoss()
    assert _descends(lambda x: crit(x, t), s)
    v = _feat(7, 10, seed=13)
    assert float(sk.attention_transfer_loss(2 * v, v)) < 1e-30
    assert _descends(lambda x: sk.attention_transfer_loss(x, v), _feat(7, 10, seed=14))


def test_attention_transfer_gradcheck():
    s = _feat(2, 3, 3, 3, seed=15).requires_grad_()
    t = _feat(2, 4, 3, 3, seed=16)
    assert torch.autograd.gradcheck(lambda x: sk.attention_transfer_loss(x, t, p=2.0), (s,))
    v = _feat(3, 5, seed=17).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sk.attention_transfer_loss(x, v.detach()), (v,))


def test_attention_transfer_bad_inputs():
    with pytest.raises(ValueError, match="teacher_features"):
        sk.attention_transfer_loss(_feat(4, 3, 5, 5), _feat(4, 3, 4, 4))
    with pytest.raises(ValueError, match="teacher_features"):
        sk.attention_transfer_loss(_feat(4, 8), _feat(4, 9))  # the (B, D) analogue needs equal D
    with pytest.raises(ValueError, match="p"):
        sk.AttentionTransferLoss(p=0)
    with pytest.raises(ValueError, match="features"):
        sk.attention_map(_feat(3, 4, 5))


# ---- factor transfer -------------------------------------------------------------------------

def test_factor_transfer_functional_values():
    f = _feat(5, 7, seed=18)
    assert float(sk.factor_transfer_loss(2.5 * f, f)) < 1e-14
    # opposite unit vectors: || -u - u ||_1 = 2 ||u||_1
    u = F.normalize(f, dim=1)
    assert_close(sk.factor_transfer_loss(-f, f), (2 * u.abs().sum(1)).mean(), rtol=1e-13,
                 name="FT")
    assert_close(sk.factor_transfer_loss(-f, f, p=2.0), torch.tensor(2.0, dtype=torch.float64),
                 rtol=1e-13, name="FT p=2")
    s = _feat(3, 2, 2, 2, seed=19).requires_grad_()
    t = _feat(3, 2, 2, 2, seed=20)
    assert torch.autograd.gradcheck(lambda x: sk.factor_transfer_loss(x, t, p=2.0), (s,))


@pytest.mark.parametrize("spatial", [False, True])
def test_factor_transfer_module(spatial):
    shape_t = (32, 12, 4, 4) if spatial else (32, 12)
    shape_s = (32, 3, 4, 4) if spatial else (32, 3)
    torch.manual_seed(0)
    t = _feat(*shape_t, seed=21, dtype=torch.float32)
    crit = sk.FactorTransferLoss(3, 12, spatial=spatial)
    s = _feat(*shape_s, seed=22, dtype=torch.float32).requires_grad_()
    with pytest.raises(RuntimeError, match="fit_paraphraser"):
        crit(s, t)
    before = float(crit.reconstruction_loss(t).detach())
    crit.fit_paraphraser(t, steps=60, lr=1e-2)
    assert float(crit.reconstruction_loss(t)) < 0.7 * before
    loss = crit(s, t)
    loss.backward()
    assert s.grad is not None and s.grad.abs().max() > 0
    assert all(p.grad is not None for p in crit.translator.parameters())
    assert all(p.grad is None and not p.requires_grad for p in crit.encoder.parameters())
    assert _descends(lambda x: crit(x, t), s, lr=1e-2)
    with pytest.raises(ValueError, match="student_features"):
        crit(_feat(*shape_t, dtype=torch.float32), t)
    with pytest.raises(ValueError, match="teacher_features"):
        crit(s, _feat(*shape_s, dtype=torch.float32))


# ---- composition -----------------------------------------------------------------------------

def test_combined_loss_with_every_logit_loss():
    g = generator(23)
    fs, ft = torch.randn(6, 4, generator=g), torch.randn(6, 9, generator=g)
    feat = sk.FitNetLoss(4, 9)
    zt = torch.randn(6, 10, generator=g)
    y = torch.tensor([7, 2, 4, 4, 2, 7])
    cost = torch.rand(10, 3, generator=g)
    cases = [
        (sk.SelKDLoss([7, 2, 4]), (torch.randn(6, 3, generator=g), zt, y)),
        (sk.SelKDLoss([7, 2, 4], open_set=True), (torch.randn(6, 4, generator=g), zt,
                                                  torch.tensor([7, 0, 2, 9, 4, 7]))),
        (sk.SelKDLoss([7, 2, 4], open_set=True, formulation="consistent"),
         (torch.randn(6, 3, generator=g), zt, torch.tensor([7, 0, 2, 9, 4, 7]))),
        (sk.SinkhornKDLoss(cost, backend="torch"), (torch.randn(6, 3, generator=g), zt)),
        (sk.MultiTeacherSinkhornKDLoss([cost, cost[:5]], weights=[0.5, 0.5], backend="torch"),
         (torch.randn(6, 3, generator=g), [zt, zt[:, :5]])),
    ]
    for logit_loss, args in cases:
        crit = sk.CombinedLoss(logit_loss, feat, feature_weight=0.3)
        got = crit(*args, student_features=fs, teacher_features=ft)
        want = logit_loss(*args) + 0.3 * feat(fs, ft)
        assert_close(got, want, rtol=1e-6, atol=1e-7, name=type(logit_loss).__name__)
    assert any(p is feat.weight for p in crit.parameters())
    plain = sk.CombinedLoss(sk.selkd_loss, sk.attention_transfer_loss, 0.0)
    args = (torch.randn(6, 3, generator=g), zt, y, [7, 2, 4])
    assert_close(plain(*args, student_features=None, teacher_features=None), sk.selkd_loss(*args),
                 name="weight 0 skips the feature term")


def test_combined_loss_bad_arguments():
    with pytest.raises(ValueError, match="logit_loss"):
        sk.CombinedLoss(3, sk.AttentionTransferLoss())
    with pytest.raises(ValueError, match="feature_loss"):
        sk.CombinedLoss(sk.selkd_loss, "at")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="feature_weight"):
            sk.CombinedLoss(sk.selkd_loss, sk.attention_transfer_loss, bad)
