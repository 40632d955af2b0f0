"""Open-set Selective KD at test time: paper 2's batch rule, the per-sample rule, gamma from the
training prior and from EM under label shift, and the metrics (docs/selective_kd.md)."""
import itertools

import numpy as np
import pytest
import torch

import selkd_kernels as sk
from tests.utils import assert_close, logits


def test_batch_rule_on_hand_made_couplings():
    # row 0: confident class 1; row 1: confident "not selected" column; rows 2-3: weak scores the
    # coupling leaves mostly unassigned, so the slack wins ("not selected")
    z = torch.tensor([[0.0, 9.0, 0.0, 0.0],
                      [0.0, 0.0, 0.0, 9.0],
                      [-9.0, -9.0, -9.0, -9.0],
                      [-8.0, -9.0, -9.0, -9.0]], dtype=torch.float64)
    out = sk.selkd_predict(z, 2.0, backend="torch")
    assert out.pred.tolist() == [1, 3, 3, 3]
    # rows 0 and 1 are saturated (mass 1), rows 2-3 share ~nothing
    assert_close(out.coupling.sum(1)[:2], torch.ones(2, dtype=torch.float64), atol=1e-3,
                 name="row masses")
    assert out.not_selected_score[0] < 0.01 and out.not_selected_score[1] > 0.99
    assert out.not_selected_score[2] > 0.99 and out.gamma == 2.0
    # consistent formulation: 3 columns, the slack is the only "not selected" answer
    out = sk.selkd_predict(z[:, :3], 2.0, formulation="consistent", backend="torch")
    assert out.pred[0] == 1 and out.pred[2] == 3 and out.pred[3] == 3


def test_batch_rule_depends_on_the_batch_but_the_sample_rule_does_not():
    z = logits(12, 4, seed=1)
    alone = sk.selkd_predict(z[:6], 3.0, backend="torch")
    # the same six samples next to six very confident selected samples
    strong = torch.cat([z[:6], torch.tensor([[12.0, 0, 0, 0]], dtype=torch.float64).repeat(6, 1)])
    mixed = sk.selkd_predict(strong, 7.5, backend="torch")
    assert not torch.equal(alone.not_selected_score, mixed.not_selected_score[:6])
    assert torch.equal(alone.sample_pred, mixed.sample_pred[:6])
    assert_close(alone.sample_not_selected_score, mixed.sample_not_selected_score[:6],
                 name="per-sample score")
    soft = torch.softmax(z[:6], 1)
    assert torch.equal(alone.sample_pred, soft.argmax(1))
    assert_close(alone.sample_not_selected_score, soft[:, 3], name="softmax of not selected")


def test_consistent_sample_rule_uses_the_reference_kappa():
    ref = logits(200, 3, seed=2)
    lk = sk.selkd_log_kappa(ref, 80.0)
    post = sk.selected_posterior(ref, formulation="consistent", log_kappa=lk)
    assert abs(post.sum().item() - 80.0) < 1e-9  # the reference batch's own coupling masses
    masses = torch.logsumexp(sk.partial_ot(ref, 80.0, backend="torch", log=True), 1).exp()
    assert_close(post, masses, rtol=1e-12, atol=1e-12, name="row masses")
    out = sk.selkd_predict(ref[:10], 4.0, formulation="consistent", log_kappa=lk,
                           backend="torch")
    assert_close(out.sample_not_selected_score, 1 - post[:10], rtol=1e-12, atol=1e-12,
                 name="sample score")
    none = sk.selkd_predict(ref[:10], 4.0, formulation="consistent", backend="torch")
    assert none.sample_pred is None and none.sample_not_selected_score is None
    with pytest.raises(ValueError, match="log_kappa"):
        sk.selected_posterior(ref, formulation="consistent")
    with pytest.raises(ValueError, match="log_kappa"):
        sk.selkd_predict(ref, "em", prior=0.4, formulation="consistent", backend="torch")
    y = torch.tensor([0, 1, 2, 3] * 50)  # 3 = not selected: 150 selected
    assert abs(sk.selkd_log_kappa(ref, "labels", labels=y) - sk.selkd_log_kappa(ref, 150.0)) \
        < 1e-12


def _shifted_gaussians(n, prior, seed):
    """Selected ~ N(+1, 1), unselected ~ N(-1, 1) in 1-D; the exact posterior under prior 0.3."""
    g = torch.Generator().manual_seed(seed)
    sel = torch.rand(n, generator=g, dtype=torch.float64) < prior
    x = torch.randn(n, generator=g, dtype=torch.float64) + torch.where(sel, 1.0, -1.0)
    logit = 2 * x + np.log(0.3 / 0.7)
    return torch.sigmoid(logit), sel


def test_em_recovers_a_shifted_prior():
    for true in (0.1, 0.3, 0.7):
        post, sel = _shifted_gaussians(20000, true, seed=3)
        est = sk.em_selected_fraction(post, 0.3)
        assert abs(est - true) < 0.02, (true, est)
    assert np.isnan(sk.em_selected_fraction(torch.tensor([float("nan")]), 0.3))
    for bad in (0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="prior"):
            sk.em_selected_fraction(post, bad)


def test_gamma_from_prior_em_and_labels():
    z = logits(40, 4, seed=4)
    y = torch.tensor([0, 1, 2, 3] * 10)
    assert sk.selkd_predict(z, "prior", prior=0.25, backend="torch").gamma == 10.0
    assert sk.selkd_predict(z, "labels", labels=y, backend="torch").gamma == 30.0
    post = sk.selected_posterior(z)
    em = sk.selkd_predict(z, "em", prior=0.25, backend="torch")
    assert abs(em.gamma - 40 * sk.em_selected_fraction(post, 0.25)) < 1e-9
    assert abs(em.coupling.sum().item() - em.gamma) < 1e-9
    with pytest.raises(ValueError, match="prior"):
        sk.selkd_predict(z, "prior", backend="torch")
    with pytest.raises(ValueError, match="gamma"):
        sk.selkd_predict(z, "oracle", backend="torch")


def test_nan_rows_are_flagged_and_leave_the_others_alone():
    z = logits(9, 4, seed=5)
    z[4, 0] = float("nan")
    out = sk.selkd_predict(z, "prior", prior=0.5, backend="torch")
    clean = [i for i in range(9) if i != 4]
    ref = sk.selkd_predict(z[clean], "prior", prior=0.5, backend="torch")
    assert out.pred[4] == -1 and out.sample_pred[4] == -1
    assert torch.isnan(out.not_selected_score[4])
    assert torch.equal(out.pred[clean], ref.pred) and out.gamma == ref.gamma == 4.0


def _pairs_auroc(s, y):
    pos, neg = s[y], s[~y]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_auroc_against_sklearn_and_a_pair_count():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for n in [5, 50, 301]:
        s = np.round(rng.normal(size=n), 1)  # rounding creates ties
        y = rng.random(n) < 0.3
        y[0], y[1] = True, False
        got = sk.auroc(torch.tensor(s), torch.tensor(y))
        assert abs(got - metrics.roc_auc_score(y, s)) < 1e-12
        if n <= 50:
            assert abs(got - _pairs_auroc(s, y)) < 1e-12
    assert np.isnan(sk.auroc(torch.tensor([0.1, 0.2]), torch.tensor([True, True])))
    assert np.isnan(sk.auroc(torch.tensor([0.1, float("nan")]), torch.tensor([True, False])))


def test_fpr_at_95_tpr_against_sklearn_roc_curve():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(1)
    for n in [20, 97, 400]:
        s = np.round(rng.normal(size=n), 1)
        y = rng.random(n) < 0.4
        y[0], y[1] = True, False
        fpr, tpr, _ = metrics.roc_curve(y, s, drop_intermediate=False)
        want = fpr[np.argmax(tpr >= 0.95 - 1e-12)]
        assert abs(sk.fpr_at_tpr(s, y, 0.95) - want) < 1e-12
    # a perfect detector has no false positives; reversed scores have all of them
    y = np.array([True] * 10 + [False] * 10)
    s = np.arange(20.0)[::-1]
    assert sk.fpr_at_tpr(s, y) == 0.0 and sk.fpr_at_tpr(-s, y) == 1.0


def test_metrics_on_a_hand_made_case():
    pred = torch.tensor([0, 1, 3, 3, 2, 0])
    y = torch.tensor([0, 2, 3, 1, 2, 3])  # n = 3
    score = torch.tensor([0.1, 0.2, 0.9, 0.8, 0.3, 0.4])
    m = sk.selkd_metrics(pred, score, y, 3)
    assert m["closed_acc"] == pytest.approx(2 / 4)  # samples 0,1,3,4 selected; 0 and 4 right
    assert m["open_acc"] == pytest.approx(3 / 6)
    # per-class recall: class 0: 1/1, class 1: 0/1, class 2: 1/2, not selected: 1/2
    assert m["balanced_open_acc"] == pytest.approx((1 + 0 + 0.5 + 0.5) / 4)
    # unselected scores 0.9, 0.4 vs selected 0.1, 0.2, 0.8, 0.3: 0.9 beats 4, 0.4 beats 3
    assert m["auroc"] == pytest.approx(7 / 8)
    # 95% TPR needs both unselected samples: threshold 0.4, selected above it: 0.8 -> 1/4
    assert m["fpr_at_95_tpr"] == pytest.approx(1 / 4)


def test_answering_not_selected_always_does_not_look_good():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 3, 3, 3, 3, 3, 3, 3, 3])  # mostly unselected
    always = sk.selkd_metrics(torch.full_like(y, 3), None, y, 3)
    assert always["open_acc"] == pytest.approx(8 / 14)  # plain accuracy flatters it
    assert always["balanced_open_acc"] == pytest.approx(1 / 4)
    assert always["closed_acc"] == 0.0


def test_balanced_accuracy_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(2)
    y = rng.integers(0, 5, 200)
    p = np.where(rng.random(200) < 0.6, y, rng.integers(0, 5, 200))
    assert abs(sk.balanced_accuracy(torch.tensor(p), torch.tensor(y)) -
               metrics.balanced_accuracy_score(y, p)) < 1e-12


def test_bad_arguments_name_themselves():
    z = logits(6, 4, seed=6)
    with pytest.raises(ValueError, match="formulation"):
        sk.selkd_predict(z, 2.0, formulation="open", backend="torch")
    with pytest.raises(ValueError, match="log_kappa"):
        sk.selkd_predict(z, 2.0, log_kappa=float("inf"), backend="torch")
    with pytest.raises(ValueError, match="local_target"):
        sk.selkd_metrics(torch.zeros(6), None, torch.full((6,), 9), 3)
    with pytest.raises(ValueError, match="tpr"):
        sk.fpr_at_tpr([0.1, 0.2], [True, False], tpr=0.0)
    with pytest.raises(ValueError, match="scores"):
        sk.auroc([0.1, 0.2, 0.3], [True, False])
