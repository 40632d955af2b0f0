"""Cost construction (paper 1, Eq. 6-8; Table 8)."""
import pytest
import torch

import selkd_kernels as sk


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
def test_euclidean_cost(dtype):
    t = torch.randn(5, 7, dtype=dtype)
    s = torch.cat([t[:2], torch.randn(1, 7, dtype=dtype)])
    M = sk.euclidean_cost(t, s)
    assert M.shape == (5, 3) and M.dtype == dtype
    torch.testing.assert_close(M, (t[:, None] - s[None]).norm(dim=-1))
    assert M[0, 0] == 0 and M[1, 1] == 0  # exact zeros on equal centres
    assert sk.euclidean_cost(t, s, normalize="max").max() == 1
    torch.testing.assert_close(sk.euclidean_cost(t, s, normalize="mean").mean(),
                               torch.tensor(1.0, dtype=dtype))


def test_paper_pipeline_cost_from_teacher():
    # Eq. 6-8: teacher centres from its classifier, student centres from teacher features
    torch.manual_seed(0)
    teacher_head = torch.nn.Linear(16, 10)
    feats = torch.randn(200, 16)
    y = torch.arange(200) % 4
    M = sk.euclidean_cost(sk.teacher_class_centers(teacher_head.weight),
                          sk.class_centers(feats, y, 4))
    assert M.shape == (10, 4) and (M >= 0).all()


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
    with pytest.raises(ValueError, match="teacher_class_ids"):
        sk.constant_cost([], [1])
