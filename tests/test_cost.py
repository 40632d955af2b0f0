"""Cost construction (paper 1, Eq. 6-8; Table 8) on cases with known values."""
import pytest
import torch

import selkd_kernels as sk
from selkd_kernels.cost import classifier_centers, classifier_cost, cost_scale


def test_class_centers_are_means():
    x = torch.tensor([[0.0, 0.0], [2.0, 2.0], [1.0, 5.0], [3.0, -1.0]])
    y = torch.tensor([0, 0, 2, 1])
    c = sk.class_centers(x, y, 3)
    torch.testing.assert_close(c, torch.tensor([[1.0, 1.0], [3.0, -1.0], [1.0, 5.0]]))


def test_class_centers_empty_class_raises():
    with pytest.raises(ValueError, match="labels"):
        sk.class_centers(torch.randn(4, 2), torch.tensor([0, 0, 2, 2]), 3)


def test_teacher_centers_are_normalised_rows():
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    torch.testing.assert_close(sk.teacher_class_centers(w), torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    torch.testing.assert_close(sk.teacher_class_centers(w, normalize=False), w)
    with pytest.raises(ValueError, match="classifier_weight"):
        sk.teacher_class_centers(torch.zeros(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_euclidean_cost_known_values(dtype):
    t = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=dtype)
    s = torch.tensor([[0.0, 0.0], [6.0, 8.0], [3.0, 0.0]], dtype=dtype)
    want = torch.tensor([[0.0, 10.0, 3.0], [5.0, 5.0, 4.0]], dtype=dtype)
    M = sk.euclidean_cost(t, s)
    assert M.dtype == dtype
    torch.testing.assert_close(M, want)
    assert M[0, 0] == 0  # exact zero on equal centres (differences, not the norm expansion)
    torch.testing.assert_close(sk.euclidean_cost(t, s, normalize="max"), want / 10)
    torch.testing.assert_close(sk.euclidean_cost(t, s, normalize="mean"), want / (27 / 6))
    torch.testing.assert_close(sk.euclidean_cost(t, s, normalize="median"),
                               want / float(want.median()))
    assert cost_scale(want, "mean") == pytest.approx(4.5) and cost_scale(want, None) == 1.0
    with pytest.raises(ValueError, match="student_centers"):
        sk.euclidean_cost(t, torch.zeros(2, 3, dtype=dtype))
    with pytest.raises(ValueError, match="cost"):
        sk.normalize_cost(torch.zeros(2, 2), "max")


def test_classifier_cost_centres_both_sides():
    # classifier rows +-(1, 0) plus a common shift (invisible after the softmax)
    w = torch.tensor([[1.0, 0.0], [-1.0, 0.0]]) + torch.tensor([5.0, 5.0])
    # ReLU-like features: all positive; class 0 lies to the right of class 1
    feats = torch.tensor([[3.0, 2.0], [3.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    y = torch.tensor([0, 0, 1, 1])
    e_t, e_s = classifier_centers(w, feats, y, 2)
    torch.testing.assert_close(e_t, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    torch.testing.assert_close(e_s, torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))
    torch.testing.assert_close(classifier_cost(w, feats, y, 2),
                               torch.tensor([[0.0, 2.0], [2.0, 0.0]]))
    # invariant to a common shift of the rows and of the features, and to their scales
    torch.testing.assert_close(classifier_cost(3 * w - 7, 0.5 * feats + 4, y, 2),
                               classifier_cost(w, feats, y, 2))
    # without centring, the student means all point into the positive orthant: the
    # uninformative cost the centring fixes
    raw = sk.euclidean_cost(sk.teacher_class_centers(w),
                            sk.class_centers(feats, y, 2) / sk.class_centers(feats, y, 2)
                            .norm(dim=1, keepdim=True))
    assert float(raw[0, 0] - raw[0, 1]).__abs__() < 0.5


def test_classifier_cost_rejects_mismatched_or_directionless_inputs():
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="classifier_weight"):
        classifier_cost(torch.ones(2, 3), torch.ones(2, 2), y, 2)
    with pytest.raises(ValueError, match="classifier_weight"):
        classifier_cost(torch.ones(2, 2), torch.tensor([[0.0, 1.0], [1.0, 0.0]]), y, 2)


def test_table8_ablation_costs():
    M = sk.constant_cost([3, 5, 7], [5, 9])
    torch.testing.assert_close(M, torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 1.0]]))
    S = sk.superclass_cost([0, 0, 1], [1, 0])
    torch.testing.assert_close(S, torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    xt, yt = torch.randn(30, 1, 4, 4), torch.arange(30) % 3
    xs, ys = torch.randn(20, 1, 4, 4), torch.arange(20) % 2
    R1 = sk.random_embedding_cost(xt, yt, 3, xs, ys, 2, seed=1)
    R2 = sk.random_embedding_cost(xt, yt, 3, xs, ys, 2, seed=1)
    R3 = sk.random_embedding_cost(xt, yt, 3, xs, ys, 2, seed=2)
    assert R1.shape == (3, 2) and torch.equal(R1, R2) and not torch.equal(R1, R3)
    # with an identity embedding it is the Euclidean cost of the input class means
    R = sk.random_embedding_cost(xt, yt, 3, xs, ys, 2, embed=lambda x: x.flatten(1))
    torch.testing.assert_close(R, sk.euclidean_cost(sk.class_centers(xt.flatten(1), yt, 3),
                                                    sk.class_centers(xs.flatten(1), ys, 2)))
    with pytest.raises(ValueError, match="teacher_class_ids"):
        sk.constant_cost([], [1])
