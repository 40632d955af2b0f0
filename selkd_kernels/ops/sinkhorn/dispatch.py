"""Backends of the Sinkhorn op and the protocol they share.

Every backend object (the reference below, ``cpp.BACKEND``, ``triton.BACKEND``) has

* ``name`` and ``supports(device) -> bool`` (see :mod:`selkd_kernels.ops.registry`);
* ``solve(a, b, cost, *, eps, n_iters, tol, check_every, method) -> SolveOutput``;
* ``kd_forward(student_logits, teacher_logits, cost, *, tau, eps, n_iters, tol, check_every,
  teacher_grad, method) -> KDForward`` (teacher = source ``a``, student = target ``b``);
* optionally ``marginal_flags(a, b, *, tol) -> (neg_a, neg_b, unbalanced) | None``: the input
  check of :func:`~selkd_kernels.ops.sinkhorn.api.sinkhorn` in one compiled pass (None where it
  does not apply; the torch check runs then).

with the semantics of :mod:`selkd_kernels.ops.sinkhorn.reference`: same iteration order, same
stopping schedule, same outputs, in the compute dtype. ``method`` ("auto", "standard", "log")
selects the standard-domain or the log-domain / stabilised iteration where a backend has both.
Outputs carry no autograd graph: gradients come from the envelope theorem
(:mod:`selkd_kernels.losses.sinkhorn_kd`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ... import _validation as V
from ..registry import BackendRegistry
from . import reference as _ref


class TorchBackend:
    """The pure-PyTorch reference as a backend (every device)."""

    name = "torch"

    def supports(self, device) -> bool:
        return True

    def solve(self, a, b, cost, *, eps, n_iters, tol, check_every, method="auto"):
        cd = V.compute_dtype(a, b, cost)
        return _ref.solve(a.to(cd), b.to(cd), cost.to(cd), eps=eps, n_iters=n_iters, tol=tol,
                          check_every=check_every, method=method)

    def kd_forward(self, student_logits, teacher_logits, cost, *, tau, eps, n_iters, tol,
                   check_every, teacher_grad, method="auto"):
        cd = V.compute_dtype(student_logits, teacher_logits, cost)
        return _ref.kd_forward(student_logits.to(cd), teacher_logits.to(cd), cost.to(cd), tau=tau,
                               eps=eps, n_iters=n_iters, tol=tol, check_every=check_every,
                               teacher_grad=teacher_grad, method=method)


REGISTRY = BackendRegistry(
    "sinkhorn",
    modules={"cpp": "selkd_kernels.ops.sinkhorn.cpp",
             "triton": "selkd_kernels.ops.sinkhorn.triton"},
    auto_order={"cpu": ("cpp", "torch"), "cuda": ("triton", "torch")},
    reference=TorchBackend())


@dataclass(frozen=True)
class SinkhornProblem:
    """What ``backend="auto"`` weighs on a GPU (see :func:`describe`, which describes CUDA calls
    only): shapes, compute dtype, shared or per-row cost, KD or plain solve, ``method`` and
    iteration count.
    Built from shapes and arguments only, so resolving a backend never reads a tensor."""
    B: int
    m: int
    n: int
    dtype_name: str
    shared: bool
    kd: bool
    method: str
    n_iters: int


def describe(a, b, cost, *, method: str, n_iters: int, kd: bool) -> SinkhornProblem | None:
    """The :class:`SinkhornProblem` of a call (``a``: source side, the teacher for KD); None for
    tensors off CUDA, where no backend weighs it (and traced code keeps symbolic shapes)."""
    if a.device.type != "cuda":
        return None
    return SinkhornProblem(B=int(a.shape[0]), m=int(a.shape[1]), n=int(b.shape[1]),
                           dtype_name=str(V.compute_dtype(a, b, cost)).replace("torch.", ""),
                           shared=cost.dim() == 2, kd=kd, method=method, n_iters=int(n_iters))


def get_backend(name: str, device, problem: SinkhornProblem | None = None):
    """Resolve ``name`` ("auto" or an explicit backend) for tensors on ``device``.

    With ``problem``, ``"auto"`` passes over a backend that estimates itself slower than the
    torch reference for that call (the Triton backend on CUDA tensors: estimates from the
    offline compile report while no GPU measurement exists, docs/gpu.md)."""
    return REGISTRY.resolve(name, device, problem=problem)


def available_backends(device=None) -> list[str]:
    """Sinkhorn backends that can run here (on ``device`` if given).

    Example:
        >>> import selkd_kernels as sk
        >>> "torch" in sk.available_backends()       # the reference runs everywhere
        True
        >>> "torch" in sk.available_backends("cpu")
        True
    """
    return REGISTRY.available(device)


REGISTRY.preload()
