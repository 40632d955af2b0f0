"""Teacher assessment (paper 1, Eq. 24, Alg. 4) and score-weighted multi-teacher distillation."""
import pytest
import torch

import selkd_kernels as sk
from selkd_kernels.assessment.score import TeacherOutputs, fit_linear_probe, teacher_cost
from selkd_kernels.losses.multi_teacher import (MultiTeacherSinkhornKDLoss, assessment_weights,
                                         multi_teacher_sinkhorn_kd_loss)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these problems are tiny: on a shared 2-core machine a second intra-op thread only adds
    # synchronisation cost (10x slower Sinkhorn steps measured), so run them single-threaded
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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
    r = sk.assess_teachers([t], y, k, progress=False, cost_normalize=None, tol=None)
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
