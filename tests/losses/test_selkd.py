"""Selective KD losses, closed and open set, both open-set formulations (paper 2;
docs/selective_kd.md). Prediction and metrics: test_selkd_inference.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import selkd_kernels as sk
from selkd_kernels.ops.partial_ot import reference as R
from tests.utils import assert_close

SEL = [7, 2, 4]  # student column j is teacher class SEL[j]
N = 9


def _batch(m=12, seed=0, dtype=torch.float64, closed=True):
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(m, N, generator=g, dtype=dtype) * 2
    if closed:
        y = torch.tensor(SEL)[torch.randint(0, len(SEL), (m,), generator=g)]
        zs = torch.randn(m, len(SEL), generator=g, dtype=dtype)
    else:
        y = torch.randint(0, N, (m,), generator=g)
        y[0] = SEL[0]  # at least one selected sample
        zs = torch.randn(m, len(SEL) + 1, generator=g, dtype=dtype)
    return zs, zt, y


@pytest.mark.parametrize("tau", [1.0, 4.0])
@pytest.mark.parametrize("tau_squared", [True, False])
def test_closed_set_equals_softmax_kl_formula(tau, tau_squared):
    zs, zt, y = _batch()
    weight = 0.7
    loss = sk.selkd_loss(zs, zt, y, SEL, tau=tau, weight=weight, tau_squared=tau_squared)
    y_loc = torch.tensor([SEL.index(int(c)) for c in y])
    kl = F.kl_div(F.log_softmax(zs / tau, 1), F.log_softmax(zt[:, SEL] / tau, 1),
                  reduction="batchmean", log_target=True)
    want = F.cross_entropy(zs, y_loc) + weight * (tau * tau if tau_squared else 1.0) * kl
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    mod = sk.SelKDLoss(SEL, tau=tau, weight=weight, tau_squared=tau_squared)
    torch.testing.assert_close(mod(zs, zt, y), want, rtol=1e-12, atol=1e-12)


def test_closed_set_teacher_gets_no_gradient_and_student_does():
    zs, zt, y = _batch()
    zs.requires_grad_()
    zt.requires_grad_()
    sk.selkd_loss(zs, zt, y, SEL).backward()
    assert zt.grad is None and torch.isfinite(zs.grad).all()


def test_balanced_coupling_matches_pot_and_marginals():
    ot = pytest.importorskip("ot")
    from selkd_kernels.losses.selkd import balanced_teacher_coupling
    zs, zt, y = _batch(m=16, seed=3)
    y_loc = torch.tensor([SEL.index(int(c)) for c in y])
    tau = 2.0
    P = balanced_teacher_coupling(zt[:, SEL], y_loc, tau, n_iters=500, backend="torch")
    counts = torch.bincount(y_loc, minlength=3).double()
    torch.testing.assert_close(P.sum(1), torch.ones(16, dtype=torch.float64))
    torch.testing.assert_close(P.sum(0), counts, rtol=1e-6, atol=1e-6)
    M = (-torch.log_softmax(zt[:, SEL] / tau, 1)).numpy()
    plan = ot.sinkhorn(np.full(16, 1 / 16), counts.numpy() / 16, M, reg=1.0, numItermax=5000,
                       stopThr=1e-14)
    np.testing.assert_allclose(P.numpy(), plan * 16, rtol=1e-6, atol=1e-8)
    loss = sk.selkd_loss(zs, zt, y, SEL, coupling="balanced", tau=tau, sinkhorn_iters=500,
                         backend="torch")
    ce = F.cross_entropy(zs, y_loc)
    kl = (torch.xlogy(P, P) - P * F.log_softmax(zs / tau, 1)).sum(1).mean()
    torch.testing.assert_close(loss, ce + tau * tau * kl, rtol=1e-6, atol=1e-6)


def test_closed_set_rejects_unselected_labels_and_bad_shapes():
    zs, zt, y = _batch()
    y2 = y.clone()
    y2[0] = 0  # class 0 is not selected
    with pytest.raises(ValueError, match="target"):
        sk.selkd_loss(zs, zt, y2, SEL)
    with pytest.raises(ValueError, match="selected_classes"):
        sk.selkd_loss(zs[:, :2], zt, y, SEL)
    with pytest.raises(ValueError, match="selected_classes"):
        sk.selkd_loss(zs, zt, y, [1, 1, 2])
    with pytest.raises(ValueError, match="teacher_logits"):
        sk.selkd_loss(zs, zt[:5], y, SEL)
    with pytest.raises(ValueError, match="tau"):
        sk.selkd_loss(zs, zt, y, SEL, tau=0)
    with pytest.raises(ValueError, match="target"):
        sk.selkd_loss(zs, zt, y.double(), SEL)
    with pytest.raises(ValueError, match="coupling"):
        sk.SelKDLoss(SEL, coupling="dykstra")


def test_open_set_teacher_logits_merge_mass_exactly():
    _, zt, _ = _batch(closed=False)
    for tau in [1.0, 3.0, 0.5]:
        zo = sk.open_set_teacher_logits(zt, SEL, temperature=tau)
        p_full = torch.softmax(zt / tau, 1)
        p_open = torch.softmax(zo / tau, 1)
        torch.testing.assert_close(p_open[:, :3], p_full[:, SEL])
        rest = [c for c in range(N) if c not in SEL]
        torch.testing.assert_close(p_open[:, 3], p_full[:, rest].sum(1))


def test_local_labels():
    y = torch.tensor([7, 0, 2, 4, 8])
    assert sk.local_labels(y, SEL, open_set=True).tolist() == [0, 3, 1, 2, 3]
    with pytest.raises(ValueError, match="target"):
        sk.local_labels(y, SEL, open_set=False)


@pytest.mark.parametrize("method", ["exact", "bregman"])
def test_open_set_loss_equals_formula(method):
    zs, zt, y = _batch(m=14, closed=False)
    y_loc = sk.local_labels(y, SEL, open_set=True)
    gamma = float((y_loc < 3).sum())
    eps, lam = 0.8, 1.7
    zo = sk.open_set_teacher_logits(zt, SEL, temperature=eps)
    log_ps = sk.partial_ot(zs, gamma, eps=eps, method=method, n_iters=6, backend="torch",
                           log=True)
    p_t = sk.partial_ot(zo, gamma, eps=eps, method=method, n_iters=6, backend="torch")
    want = (-log_ps[torch.arange(14), y_loc].sum() - lam * (p_t * log_ps).sum()) / 14
    for be in sk.available_partial_ot_backends("cpu"):
        loss = sk.selkd_loss(zs, zt, y, SEL, open_set=True, eps=eps, weight=lam, method=method,
                             n_iters=6, backend=be)
        torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-10)
    mod = sk.SelKDLoss(SEL, open_set=True, eps=eps, weight=lam, method=method, n_iters=6,
                       backend="torch")
    assert mod.num_outputs == 4
    torch.testing.assert_close(mod(zs, zt, y), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["exact", "bregman"])
def test_open_set_loss_gradcheck(method):
    zs, zt, y = _batch(m=8, seed=5, closed=False)
    zs.requires_grad_()
    # the Triton interpreter is too slow for gradcheck's many calls; its gradient is compared
    # with the reference in test_partial_ot_kernels.py
    for be in [b for b in sk.available_partial_ot_backends("cpu") if b != "triton"]:
        f = lambda z: sk.selkd_loss(z, zt, y, SEL, open_set=True, eps=0.9, weight=2.0,  # noqa
                                    method=method, n_iters=4, backend=be)
        assert torch.autograd.gradcheck(f, (zs,), eps=1e-6, atol=1e-7), be


def test_open_set_bad_inputs():
    zs, zt, y = _batch(closed=False)
    with pytest.raises(ValueError, match="student_logits"):
        sk.selkd_loss(zs[:, :3], zt, y, SEL, open_set=True)
    with pytest.raises(ValueError, match="gamma"):
        sk.selkd_loss(zs, zt, y, SEL, open_set=True, gamma=100)
    with pytest.raises(ValueError, match="gamma"):
        sk.selkd_loss(zs, zt, torch.zeros_like(y), SEL, open_set=True)  # nobody selected
    with pytest.raises(ValueError, match="eps"):
        sk.selkd_loss(zs, zt, y, SEL, open_set=True, eps=-1)
    with pytest.raises(ValueError, match="target"):
        sk.open_set_selkd_loss(zs, zs, torch.full((12,), 4))
    with pytest.raises(ValueError, match="teacher_scores"):
        sk.open_set_selkd_loss(zs, zs[:, :3], y)
    with pytest.raises(ValueError, match="selected_classes"):
        sk.open_set_teacher_logits(zt, list(range(N)))


@pytest.mark.parametrize("method", ["exact", "bregman"])
def test_consistent_open_set_loss_equals_reference(method):
    """formulation="consistent": n student columns, the teacher's selected logits, labels of
    unselected classes trained through the leftover row mass."""
    zs, zt, y = _batch(m=14, closed=False)
    zs = zs[:, :3].contiguous()
    y_loc = sk.local_labels(y, SEL, open_set=True)
    gamma = float((y_loc < 3).sum())
    zt_c = 0.8 * torch.log_softmax(zt / 0.8, 1)[:, SEL]
    want = R.open_set_loss(zs, zt_c, y_loc, gamma, 0.8, 1.7, method, 6, "consistent")
    for be in sk.available_partial_ot_backends("cpu"):
        loss = sk.selkd_loss(zs, zt, y, SEL, open_set=True, formulation="consistent", eps=0.8,
                             weight=1.7, method=method, n_iters=6, backend=be)
        assert_close(loss, want, rtol=1e-10, atol=1e-10, name=f"loss ({be})")
    mod = sk.SelKDLoss(SEL, open_set=True, formulation="consistent", eps=0.8, weight=1.7,
                       method=method, n_iters=6, backend="torch")
    assert mod.num_outputs == 3
    assert_close(mod(zs, zt, y), want, rtol=1e-10, atol=1e-10, name="module loss")
    with pytest.raises(ValueError, match="student_logits"):
        mod(torch.randn(14, 4, dtype=torch.float64), zt, y)


@pytest.mark.parametrize("formulation", ["paper", "consistent"])
def test_open_set_gradcheck_both_formulations(formulation):
    zs, zt, y = _batch(m=8, seed=5, closed=False)
    if formulation == "consistent":
        zs = zs[:, :3].contiguous()
    zs.requires_grad_()
    # the Triton interpreter is too slow for gradcheck's many calls; its gradient is compared
    # with the reference and with central differences in tests/ops/partial_ot/test_kernels.py
    for be in [b for b in sk.available_partial_ot_backends("cpu") if b != "triton"]:
        def f(z):
            return sk.selkd_loss(z, zt, y, SEL, open_set=True, formulation=formulation, eps=0.9,
                                 weight=2.0, n_iters=4, backend=be)
        assert torch.autograd.gradcheck(f, (zs,), eps=1e-6, atol=1e-7), be


def test_unlabelled_batches_give_the_distillation_term_alone():
    zs, zt, y = _batch()
    kd = sk.selkd_loss(zs, zt, None, SEL, tau=2.0, weight=0.5)
    full = sk.selkd_loss(zs, zt, y, SEL, tau=2.0, weight=0.5)
    y_loc = sk.local_labels(y, SEL, open_set=False)
    assert_close(full - kd, F.cross_entropy(zs, y_loc), rtol=1e-12, atol=1e-12, name="CE part")
    zs, zt, y = _batch(m=10, closed=False)
    for formulation, cols in (("paper", 4), ("consistent", 3)):
        z = zs[:, :cols].contiguous()
        kd = sk.selkd_loss(z, zt, None, SEL, open_set=True, formulation=formulation, gamma=4.0)
        want = R.open_set_loss(z, sk.open_set_teacher_scores(zt, SEL, formulation=formulation),
                               torch.full((10,), -1), 4.0, 1.0, 1.0, "exact", 10, formulation)
        assert_close(kd, want, rtol=1e-12, atol=1e-12, name=formulation)
        with pytest.raises(ValueError, match="gamma"):
            sk.selkd_loss(z, zt, None, SEL, open_set=True, formulation=formulation)
    with pytest.raises(ValueError, match="target"):
        sk.selkd_loss(zs[:, :3], zt, None, SEL, coupling="balanced")


@pytest.mark.parametrize("bad", [-1, N, 10 ** 12])
def test_open_set_labels_outside_the_teacher_classes_raise(bad):
    zs, zt, y = _batch(closed=False)
    y = y.clone()
    y[3] = bad
    for formulation, cols in (("paper", 4), ("consistent", 3)):
        with pytest.raises(ValueError, match="target"):
            sk.selkd_loss(zs[:, :cols], zt, y, SEL, open_set=True, formulation=formulation)
    with pytest.raises(ValueError, match="target"):
        sk.local_labels(y, SEL, open_set=True, num_classes=N)


def test_weights_validated_and_numpy_scalars_accepted():
    for bad in [float("nan"), float("inf"), -1.0, "1"]:
        with pytest.raises(ValueError, match="weight"):
            sk.SelKDLoss(SEL, weight=bad)
        with pytest.raises(ValueError, match="weight"):
            sk.selkd_loss(*_batch(), SEL, weight=bad)
    zs, zt, y = _batch()
    mod = sk.SelKDLoss(SEL, weight=np.float32(0.5), tau=np.float64(2.0), eps=np.float32(0.7),
                       n_iters=np.int64(4), gamma=np.float32(5.0))
    assert_close(mod(zs, zt, y), sk.selkd_loss(zs, zt, y, SEL, weight=0.5, tau=2.0),
                 rtol=1e-6, atol=1e-6, name="numpy-configured module")
    with pytest.raises(ValueError, match="formulation"):
        sk.SelKDLoss(SEL, open_set=True, formulation="dykstra")
    with pytest.raises(ValueError, match="gamma"):
        sk.SelKDLoss(SEL, open_set=True, gamma="count")


def test_teacher_scores_of_both_formulations():
    _, zt, _ = _batch(closed=False)
    paper = sk.open_set_teacher_scores(zt, SEL, formulation="paper", eps=0.5)
    assert_close(paper, sk.open_set_teacher_logits(zt, SEL, temperature=0.5), name="paper")
    cons = sk.open_set_teacher_scores(zt, SEL, formulation="consistent", eps=0.5)
    # K = exp(Z / eps) has row sums = the teacher's probability of a selected class at eps
    assert_close(torch.exp(cons / 0.5).sum(1), torch.softmax(zt / 0.5, 1)[:, SEL].sum(1),
                 rtol=1e-12, name="consistent row masses")
    assert_close(sk.open_set_teacher_scores(zt + 7.0, SEL, formulation="consistent"),
                 sk.open_set_teacher_scores(zt, SEL, formulation="consistent"), rtol=1e-12,
                 atol=1e-12, name="invariant to a row's logit offset")
    with pytest.raises(ValueError, match="selected_classes"):
        sk.open_set_teacher_scores(zt, [1, 99], formulation="consistent")
