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
    ("b must carry the same mass", dict(b=2 * b)),
    ("eps_scaling", dict(eps_scaling=1.5)),
    ("eps", dict(eps=1e-45)),          # 0 in float32
    ("eps", dict(eps=1e-20)),          # below sqrt(tiny) of float32
    ("eps", dict(eps=1e300)),          # inf in float32
    ("eps", dict(eps=1e20)),           # above sqrt(max) of float32
    ("eps", dict(a=a.double(), b=b.double(), cost=M.double(), eps=1e-160)),
    ("eps", dict(a=a.double(), b=b.double(), cost=M.double(), eps=1e300)),
    ("grad", dict(grad="implicit")),
    ("scaling_iters", dict(eps_scaling=0.5, scaling_iters=0)),
]


@pytest.mark.parametrize("name,kw", SINKHORN_CASES)
def test_sinkhorn_bad_input(name, kw):
    args = dict(a=a, b=b, cost=M)
    args.update({k: v for k, v in kw.items() if k in args})
    opts = {k: v for k, v in kw.items() if k not in args}
    # the message starts with the argument's name
    with pytest.raises(ValueError, match=rf"^{name}\b"):
        sk.sinkhorn(args["a"], args["b"], args["cost"], **opts)


@pytest.mark.parametrize("dtype,eps", [(torch.float32, 1.1e-19), (torch.float32, 1.8e19),
                                       (torch.float64, 1e-45), (torch.float64, 1e150)])
def test_eps_at_the_edges_of_the_range_gives_finite_loss(dtype, eps):
    r = sk.sinkhorn(a.to(dtype), b.to(dtype), M.to(dtype), eps=eps, n_iters=20)
    assert torch.isfinite(r.loss).all() and torch.isfinite(r.err).all()


@pytest.mark.parametrize("tau", [1.1e-19, 1.8e19])
def test_tau_at_the_edges_of_the_range_gives_finite_loss(tau):
    zs_ = zs.clone().requires_grad_(True)
    loss = sk.sinkhorn_kd_loss(zs_, zt, M, tau=tau, n_iters=20)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(zs_.grad).all()


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
    ("tau", dict(tau=1e-45)),
    ("tau", dict(tau=1e300)),
    ("eps", dict(eps=1e300)),
    ("tau", dict(student_logits=zs.double(), teacher_logits=zt.double(), cost=M.double(),
                 tau=1e300)),
    ("method", dict(method="fast")),
    ("backend", dict(backend="bogus")),
]


@pytest.mark.parametrize("name,kw", KD_CASES)
def test_kd_loss_bad_input(name, kw):
    args = dict(student_logits=zs, teacher_logits=zt, cost=M)
    args.update({k: v for k, v in kw.items() if k in args})
    opts = {k: v for k, v in kw.items() if k not in args}
    with pytest.raises(ValueError, match=rf"^{name}\b"):
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
    with pytest.raises(ValueError, match=r"^target must lie in \[0, 5\)"):
        crit(zs, zt, torch.tensor([0, 1, 5]))      # IndexError in cross_entropy before
    with pytest.raises(ValueError, match=r"^target must lie in"):
        crit(zs, zt, torch.tensor([0, -1, 2]))
    assert torch.isfinite(crit(zs, zt, torch.tensor([0, 1, 4], dtype=torch.int8)))


@pytest.mark.parametrize("make", [
    lambda **kw: sk.SinkhornKDLoss(M, **kw),
    lambda **kw: sk.MultiTeacherSinkhornKDLoss([M], weights=[1.0], **kw),
    lambda **kw: sk.SelKDLoss([0, 2], **kw),
    lambda **kw: sk.SelKDLoss([0, 2], open_set=True, **kw),
], ids=["kd", "multi_teacher", "selkd_closed", "selkd_open"])
def test_module_constructors_reject_unknown_backend(make):
    with pytest.raises(ValueError, match="^backend must be one of"):
        make(backend="bogus")
    make(backend="torch")


@pytest.mark.parametrize("name,value", [("tau", 1e-200), ("tau", 1e300), ("eps", 0.0),
                                        ("eps", 1e300)])
def test_module_constructors_check_the_range(name, value):
    with pytest.raises(ValueError, match=f"^{name}"):
        sk.SinkhornKDLoss(M, **{name: value})


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
