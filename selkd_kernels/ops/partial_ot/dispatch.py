"""Backends of the partial-OT op and the protocol they share.

Every backend object (the reference below, ``cpp.BACKEND``, ``triton.BACKEND``) has

* ``name`` and ``supports(device) -> bool`` (see :mod:`selkd_kernels.ops.registry`);
* ``coupling(scores, *, gamma, eps, method, n_iters) -> (log_p, l, rho, sat)``: ``log P`` (m, k),
  the row log-masses ``l`` of ``K = exp(Z / eps)``, the row log-masses ``rho`` of the coupling,
  and the saturated-row mask ``sat`` (exact method; None for ``"bregman"``);
* ``loss_forward(student_scores, teacher_scores, target, *, gamma, eps, lam, method, n_iters,
  formulation) -> (loss, grad)``: the open-set loss (a 0-d tensor) of ``formulation``
  (``"paper"`` or ``"consistent"``) and its gradient w.r.t. the student scores; ``target`` is an
  int64 tensor of local labels, ``-1`` for a row without one,

``gamma`` arrives as a 0-d tensor in the compute dtype on the scores' device (a number, or the
selected count of a ``gamma="labels"`` batch, never synchronised to the host), ``eps``, ``lam``
and ``n_iters`` as Python numbers,

with the semantics of :mod:`selkd_kernels.ops.partial_ot.reference`, in the compute dtype and
without an autograd graph: :mod:`selkd_kernels.ops.partial_ot.api` and
:mod:`selkd_kernels.losses.selkd` attach the closed-form backward
(:func:`~selkd_kernels.ops.partial_ot.reference.grad_scores`) the same way for every backend.
"""
from __future__ import annotations

import torch

from ... import _validation as V
from ..registry import BackendRegistry
from . import reference as _ref


class TorchBackend:
    """The pure-PyTorch reference as a backend (every device, any batch size)."""

    name = "torch"

    def supports(self, device) -> bool:
        return True

    def coupling(self, scores, *, gamma, eps, method, n_iters):
        z = scores.detach().to(V.compute_dtype(scores))
        with torch.no_grad():
            return _ref.coupling_parts(z, gamma, eps, method, n_iters)

    def loss_forward(self, student_scores, teacher_scores, target, *, gamma, eps, lam, method,
                     n_iters, formulation):
        cd = V.compute_dtype(student_scores, teacher_scores)
        with torch.no_grad():
            return _ref.loss_and_grad(student_scores.to(cd), teacher_scores.to(cd), target,
                                      gamma, eps, lam, method, n_iters, formulation)


REGISTRY = BackendRegistry(
    "partial_ot",
    modules={"cpp": "selkd_kernels.ops.partial_ot.cpp",
             "triton": "selkd_kernels.ops.partial_ot.triton"},
    auto_order={"cpu": ("cpp", "torch"), "cuda": ("triton", "torch")},
    reference=TorchBackend())


def get_backend(name: str, device):
    """Resolve ``name`` ("auto" or explicit) for tensors on ``device``."""
    return REGISTRY.resolve(name, device)


def available_backends(device=None) -> list[str]:
    """Partial-OT backends that can run here (on ``device`` if given)."""
    return REGISTRY.available(device)


REGISTRY.preload()
