"""Every bad input listed in docs/guarantees.md raises ValueError naming the argument."""
import pytest
import torch

import selkd_kernels as sk

a = torch.softmax(torch.randn(3, 4), -1)
b = torch.softmax(torch.randn(3, 5), -1)
M = torch.rand(4, 5)
zs, zt = torch.randn(3, 5), torch.randn(3, 4)

SINKHORN_CASES = [
    ("a", dict(a=a[0])),
    ("a", dict(a=a.long())),
    ("a", dict(a=[[0.5, 0.5]])),
    ("a", dict(a=torch.empty(3, 0))),
    ("b", dict(b=b[:2])),
    ("cost", dict(cost=torch.rand(5, 4))),
    ("cost", dict(cost=torch.rand(2, 4, 5))),
    ("cost", dict(cost=torch.rand(4))),
    ("cost", dict(cost=torch.rand(4, 5).int())),
    ("cost", dict(cost=torch.rand(4, 5, device="meta"))),
    ("eps", dict(eps=0.0)),
    ("eps", dict(eps=-1.0)),
    ("eps", dict(eps=float("nan"))),
    ("eps", dict(eps="0.1")),
    ("n_iters", dict(n_iters=0)),
    ("n_iters", dict(n_iters=2.5)),
    ("tol", dict(tol=-1e-3)),
    ("check_every", dict(check_every=0)),
    ("method", dict(method="fast")),
    ("backend", dict(backend="gpu")),
    ("a must be non-negative", dict(a=a - 0.5)),
    ("b must be non-negative", dict(b=-b)),
    ("same mass", dict(b=2 * b)),
    ("eps_scaling", dict(eps_scaling=1.5)),
]


@pytest.mark.parametrize("name,kw", SINKHORN_CASES)
def test_sinkhorn_bad_input(name, kw):
    args = dict(a=a, b=b, cost=M)
    args.update({k: v for k, v in kw.items() if k in args})
    opts = {k: v for k, v in kw.items() if k not in args}
    with pytest.raises(ValueError, match=name):
        sk.sinkhorn(args["a"], args["b"], args["cost"], **opts)


KD_CASES = [
    ("student_logits", dict(student_logits=zs[:2])),
    ("student_logits", dict(student_logits=zs.long())),
    ("teacher_logits", dict(teacher_logits=zt[0])),
    ("cost", dict(cost=M.T)),
    ("tau", dict(tau=0.0)),
    ("tau", dict(tau=-3.0)),
    ("eps", dict(eps=0)),
    ("reduction", dict(reduction="avg")),
    ("grad", dict(grad="autograd")),
    ("cost", dict(cost=M.to("meta"))),
]


@pytest.mark.parametrize("name,kw", KD_CASES)
def test_kd_loss_bad_input(name, kw):
    args = dict(student_logits=zs, teacher_logits=zt, cost=M)
    args.update({k: v for k, v in kw.items() if k in args})
    opts = {k: v for k, v in kw.items() if k not in args}
    with pytest.raises(ValueError, match=name):
        sk.sinkhorn_kd_loss(args["student_logits"], args["teacher_logits"], args["cost"], **opts)


def test_module_bad_input():
    with pytest.raises(ValueError, match="cost"):
        sk.SinkhornKDLoss(torch.rand(2, 3, 4))
    with pytest.raises(ValueError, match="tau"):
        sk.SinkhornKDLoss(M, tau=0)
    with pytest.raises(ValueError, match="weight"):
        sk.SinkhornKDLoss(M, weight=-1)
    crit = sk.SinkhornKDLoss(M)
    with pytest.raises(ValueError, match="target"):
        crit(zs, zt, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="target"):
        crit(zs, zt, torch.rand(3))
    with pytest.raises(ValueError, match="student_logits"):
        crit(zs[:, :3], zt)


def test_cost_builders_bad_input():
    with pytest.raises(ValueError, match="labels"):
        sk.class_centers(torch.randn(4, 2), torch.tensor([0, 1, 5, 0]), 3)
    with pytest.raises(ValueError, match="labels"):
        sk.class_centers(torch.randn(4, 2), torch.tensor([0.0, 1, 1, 0]), 2)
    with pytest.raises(ValueError, match="num_classes"):
        sk.class_centers(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), 0)
    with pytest.raises(ValueError, match="student_centers"):
        sk.euclidean_cost(torch.randn(3, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="normalize"):
        sk.euclidean_cost(torch.randn(3, 4), torch.randn(2, 4), normalize="l2")
    with pytest.raises(ValueError, match="cost"):
        sk.normalize_cost(torch.zeros(2, 2), "max")


def test_env_var_must_name_a_backend(monkeypatch):
    monkeypatch.setenv("SELKD_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SELKD_BACKEND"):
        sk.sinkhorn(a, b, M)
    monkeypatch.setenv("SELKD_BACKEND", "torch")
    assert sk.sinkhorn(a, b, M).backend == "torch"
