"""Teacher assessment (paper 1, Eq. 24, Alg. 4) and score-weighted multi-teacher distillation."""
import pytest
import torch

import selkd_kernels as sk
from selkd_kernels.assessment.score import TeacherOutputs, fit_linear_probe, teacher_cost
from selkd_kernels.losses.multi_teacher import (MultiTeacherSinkhornKDLoss, assessment_weights,
                                         multi_teacher_sinkhorn_kd_loss)



def _teacher(name, features, logits, labels_for_centres=None, weight=None):
    c_t = logits.shape[1]
    if labels_for_centres is not None:
        centres = sk.class_centers(features, labels_for_centres, c_t)
        return TeacherOutputs(name, features, logits, class_centers=centres)
    return TeacherOutputs(name, features, logits, classifier_weight=weight)


def _zoo(n_per=40, k=4, d=16, seed=0):
    """Target task with k classes; teachers whose relation to it is known by construction.

    * ``same``: trained on the target classes: features separate them, logits predict them.
    * ``noisy``: same teacher, its features and logits blurred by noise (half-related).
    * ``random``: features and logits independent of the target labels.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(n_per)
    proto = torch.randn(k, d, generator=g) * 3
    feat = torch.relu(proto[y] + torch.randn(len(y), d, generator=g))
    logits = 4 * torch.nn.functional.one_hot(y, k).float() + torch.randn(len(y), k, generator=g)
    noisy_f = torch.relu(proto[y] * 0.3 + 2 * torch.randn(len(y), d, generator=g))
    noisy_z = 0.8 * torch.nn.functional.one_hot(y, k).float() + torch.randn(len(y), k, generator=g)
    rand_f = torch.relu(torch.randn(len(y), d, generator=g) * 3)
    rand_z = torch.randn(len(y), 6, generator=g) * 2
    rand_y = torch.randint(0, 6, (len(y),), generator=g)
    teachers = [
        _teacher("random", rand_f, rand_z, labels_for_centres=rand_y),
        _teacher("same", feat, logits, labels_for_centres=y),
        _teacher("noisy", noisy_f, noisy_z, labels_for_centres=noisy_z.argmax(1)),
    ]
    return teachers, y, k


def test_approx2_picks_the_related_teacher():
    teachers, y, k = _zoo()
    r = sk.assess_teachers(teachers, y, k, progress=False)
    assert r.method == "approx2"
    assert r.best_name == "same"
    assert [r.names[i] for i in r.ranking] == ["same", "noisy", "random"]
    assert r.scores[1] < r.scores[2] < r.scores[0]
    assert len(r.seconds) == 3 and all(s >= 0 for s in r.seconds)
    assert [tuple(c.shape) for c in r.costs] == [(6, k), (k, k), (k, k)]
    d = r.as_dict()
    assert d["best_name"] == "same" and len(d["scores"]) == 3


def test_approx2_with_classifier_centres_and_progress_bar():
    teachers, y, k = _zoo()
    # Eq. 8: teacher centres from a classifier weight instead of stored centres
    same = teachers[1]
    w = sk.class_centers(same.features, y, k)
    eq8 = TeacherOutputs("same-eq8", same.features, same.logits, classifier_weight=w)
    r = sk.assess_teachers([teachers[0], eq8], y, k, progress=True)
    assert r.best_name == "same-eq8"


def test_approx1_and_exact_paths():
    teachers, y, k = _zoo()
    student = 4 * torch.nn.functional.one_hot(y, k).float()
    r1 = sk.assess_teachers(teachers, y, k, method="approx1", student_logits=student,
                            progress=False)
    assert r1.best_name == "same"
    seen = []

    def train_student(t, cost, labels):
        seen.append((t.name, tuple(cost.shape)))
        return fit_linear_probe(t.features, labels, k)

    r2 = sk.assess_teachers(teachers, y, k, method="exact", train_student=train_student,
                            progress=False)
    assert [s[0] for s in seen] == ["random", "same", "noisy"]
    # with the probe as the "trained" student, exact equals Approximation II
    r3 = sk.assess_teachers(teachers, y, k, progress=False)
    torch.testing.assert_close(r2.scores, r3.scores)


def test_score_is_mean_sinkhorn_distance():
    teachers, y, k = _zoo()
    t = teachers[1]
    r = sk.assess_teachers([t], y, k, score="sinkhorn", progress=False, cost_normalize=None,
                           tol=None)
    z_f = fit_linear_probe(t.features, y, k)
    cost = teacher_cost(t, y, k)
    want = sk.sinkhorn_kd_loss(z_f, t.logits, cost, tau=3.0, eps=0.1, n_iters=100)
    assert float(r.scores[0]) == pytest.approx(float(want), rel=1e-4, abs=1e-6)


def test_linear_probe_is_deterministic_and_fits():
    teachers, y, k = _zoo()
    z1 = fit_linear_probe(teachers[1].features, y, k)
    z2 = fit_linear_probe(teachers[1].features, y, k)
    assert torch.equal(z1, z2)
    assert float((z1.argmax(1) == y).float().mean()) > 0.95


def test_assessment_validation():
    teachers, y, k = _zoo()
    with pytest.raises(ValueError, match="method"):
        sk.assess_teachers(teachers, y, k, method="nope", progress=False)
    with pytest.raises(ValueError, match="student_logits"):
        sk.assess_teachers(teachers, y, k, method="approx1", progress=False)
    with pytest.raises(ValueError, match="train_student"):
        sk.assess_teachers(teachers, y, k, method="exact", progress=False)
    with pytest.raises(ValueError, match="labels"):
        sk.assess_teachers(teachers, y[:-1], k, progress=False)
    with pytest.raises(ValueError, match="teachers"):
        sk.assess_teachers([], y, k, progress=False)
    with pytest.raises(ValueError, match="classifier_weight"):
        TeacherOutputs("x", torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="class_centers"):
        TeacherOutputs("x", torch.randn(4, 3), torch.randn(4, 2), class_centers=torch.randn(3, 3))
    with pytest.raises(ValueError, match="logits"):
        TeacherOutputs("x", torch.randn(4, 3), torch.randn(5, 2), class_centers=torch.randn(2, 3))


# -------------------------------------------------------------------------- multi-teacher

def test_assessment_weights():
    w = assessment_weights([0.2, 0.5, 0.2], temperature=0.1)
    assert float(w.sum()) == pytest.approx(1.0)
    assert w[0] == pytest.approx(w[2]) and w[0] > w[1]
    assert float(assessment_weights([0.1, 0.9], temperature=1e-3)[0]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="temperature"):
        assessment_weights([0.1], temperature=0)


def test_multi_teacher_loss_is_weighted_sum_and_differentiable():
    torch.manual_seed(0)
    z_s = torch.randn(8, 5, requires_grad=True)
    z_ts = [torch.randn(8, 4), torch.randn(8, 6)]
    costs = [torch.rand(4, 5), torch.rand(6, 5)]
    w = [0.3, 0.7]
    got = multi_teacher_sinkhorn_kd_loss(z_s, z_ts, costs, w)
    want = sum(wi * sk.sinkhorn_kd_loss(z_s, z, c) for wi, z, c in zip(w, z_ts, costs))
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    got.backward()
    assert z_s.grad is not None and torch.isfinite(z_s.grad).all()

    crit = MultiTeacherSinkhornKDLoss(costs, scores=[0.1, 5.0], temperature=0.1, weight=10.0)
    target = torch.randint(0, 5, (8,))
    single = sk.SinkhornKDLoss(costs[0], weight=10.0)
    assert float(crit(z_s, z_ts, target)) == pytest.approx(float(single(z_s, z_ts[0], target)),
                                                           rel=1e-5)
    with pytest.raises(ValueError, match="scores"):
        MultiTeacherSinkhornKDLoss(costs)
    with pytest.raises(ValueError, match="teacher_logits"):
        crit(z_s, z_ts[:1])
    with pytest.raises(ValueError, match="weights"):
        multi_teacher_sinkhorn_kd_loss(z_s, z_ts, costs, [1.0])


# ------------------------------------------------------------------------ score variants

def _same_space():
    """Three classes on both sides with the same centres: teacher = student."""
    c = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    return c, sk.euclidean_cost(c, c)


def test_divergence_is_zero_on_identical_inputs_and_nonnegative():
    from selkd_kernels.assessment.score import transport_rows
    _, m = _same_space()
    z = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)) * 3
    d = transport_rows(z, z, m, score="divergence", self_costs=(m, m), tau=1.0, eps=0.1)
    assert float(d.abs().max()) < 1e-5
    # S_eps itself is not zero there: its entropy term is the bias the divergence removes
    s = transport_rows(z, z, m, score="sinkhorn", tau=1.0, eps=0.1)
    assert float(s.abs().min()) > 1e-3
    other = torch.randn(16, 3, generator=torch.Generator().manual_seed(1)) * 3
    d2 = transport_rows(z, other, m, score="divergence", self_costs=(m, m), tau=1.0, eps=0.1)
    assert float(d2.min()) > -1e-6 and float(d2.mean()) > 1e-3
    with pytest.raises(ValueError, match="self_costs"):
        transport_rows(z, z, m, score="divergence")


def test_transport_score_is_the_plan_cost():
    from selkd_kernels.assessment.score import transport_rows
    g = torch.Generator().manual_seed(2)
    zt, zs, m = torch.randn(5, 4, generator=g), torch.randn(5, 3, generator=g), \
        torch.rand(4, 3, generator=g)
    got = transport_rows(zt, zs, m, score="transport", tau=2.0, eps=0.1, tol=1e-9,
                         n_iters=2000)
    r = sk.sinkhorn(torch.softmax(zt / 2, 1), torch.softmax(zs / 2, 1), m, eps=0.1,
                    n_iters=2000, tol=1e-9, return_plan=True)
    want = (r.plan * m).sum((1, 2))
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-6)
    # S_eps = <T, M> - eps H(T): the entropy term is positive, so S_eps < <T, M>
    s = transport_rows(zt, zs, m, score="sinkhorn", tau=2.0, eps=0.1, tol=1e-9, n_iters=2000)
    assert bool((s < got).all())


def test_teacher_costs_share_one_scale():
    from selkd_kernels.assessment.score import teacher_costs
    teachers, y, k = _zoo()
    for t in teachers:
        raw = teacher_costs(t, y, k)
        norm = teacher_costs(t, y, k, normalize="mean")
        scale = float(raw[0].mean())
        for a, b in zip(raw, norm):
            torch.testing.assert_close(a / scale, b)
        assert float(norm[0].mean()) == pytest.approx(1.0)
        assert float(raw[1].diagonal().abs().max()) == 0
        assert float(raw[2].diagonal().abs().max()) == 0
        assert raw[1].shape == (t.num_classes, t.num_classes) and raw[2].shape == (k, k)


def test_cross_validated_probe_predicts_out_of_fold():
    from selkd_kernels.assessment.score import (_softmax_regressions, _standardise,
                                                cross_validated_probe, stratified_folds)
    teachers, y, k = _zoo(n_per=6)
    f = teachers[2].features
    z, wd, losses = cross_validated_probe(f, y, k, weight_decays=(1e-2, 1.0), folds=3)
    assert wd in (1e-2, 1.0) and len(losses) == 2
    assert losses[(1e-2, 1.0).index(wd)] == min(losses)
    fold = stratified_folds(y, 3)
    assert all(int(torch.bincount(y[fold == j], minlength=k).min()) == 2 for j in range(3))
    # rows of fold 0 come from a probe fitted on folds 1-2 only
    x = _standardise(f)
    w, b = _softmax_regressions(x, y, (fold != 0).double().unsqueeze(0), k, wd, 500)
    want = (x @ w[0] + b[0])[fold == 0]
    torch.testing.assert_close(z[fold == 0].double(), want, atol=1e-4, rtol=1e-4)
    z2, wd2, _ = cross_validated_probe(f, y, k, weight_decays=(1e-2, 1.0), folds=3)
    assert torch.equal(z, z2) and wd2 == wd
    with pytest.raises(ValueError, match="labels"):
        cross_validated_probe(f[:5], torch.tensor([0, 0, 1, 1, 2]), 3)  # class 2: one sample


def test_in_sample_probe_memorises_where_cross_validation_does_not():
    # more dimensions than samples, features unrelated to the labels (the few-shot regime)
    g = torch.Generator().manual_seed(3)
    feats, y, k = torch.randn(40, 100, generator=g), torch.arange(40) % 4, 4
    z_in = fit_linear_probe(feats, y, k, weight_decay=1e-4)
    from selkd_kernels.assessment.score import cross_validated_probe
    z_cv, _, _ = cross_validated_probe(feats, y, k)
    acc_in = float((z_in.argmax(1) == y).float().mean())
    acc_cv = float((z_cv.argmax(1) == y).float().mean())
    assert acc_in > 0.9 and acc_cv < 0.6


@pytest.mark.parametrize("score", ["sinkhorn", "transport", "divergence"])
@pytest.mark.parametrize("probe", ["fixed", "cv"])
def test_assess_teachers_variants_rank_the_related_teacher_first(score, probe):
    teachers, y, k = _zoo()
    r = sk.assess_teachers(teachers, y, k, score=score, probe=probe, progress=False)
    assert r.best_name == "same" and r.score == score and r.probe == probe
    assert len(r.rows) == 3 and all(row.shape == (len(y),) for row in r.rows)
    torch.testing.assert_close(torch.stack([row.mean() for row in r.rows]), r.scores)
    if probe == "cv":
        assert all(w in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) for w in r.probe_weight_decay)
    with pytest.raises(ValueError, match="score"):
        sk.assess_teachers(teachers, y, k, score="kl", progress=False)
    with pytest.raises(ValueError, match="probe"):
        sk.assess_teachers(teachers, y, k, probe="loo", progress=False)
