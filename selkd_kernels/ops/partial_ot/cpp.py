"""C++ CPU backend for the open-set coupling (ops ``selkd::partial_ot_coupling`` and
``selkd::partial_ot_loss`` from ``csrc/partial_ot_cpu.cpp``, built into ``selkd_kernels._C``).

Importing this module fails (and the "cpp" backend is then simply unavailable) when the extension
is not built or was built without these ops. Both ops take ``gamma`` as a 0-d tensor, so a
``gamma="labels"`` count computed on the batch reaches them without a host round trip while
``torch.compile`` traces; their fake (meta) implementations below give the output shapes and
check the input shapes with ``torch._check``.
"""
from __future__ import annotations

import torch

from ... import _extension
from ... import _validation as V
from . import reference as _ref
from .reference import FORMULATION_CODE, METHOD_CODE

_extension.require_ops("partial_ot_coupling", "partial_ot_loss")


def _register_fakes():
    try:
        @torch.library.register_fake("selkd::partial_ot_coupling")
        def _coupling_fake(scores, gamma, eps, method, n_iters):
            torch._check(scores.dim() == 2, lambda: "scores must be 2-D")
            torch._check(gamma.dim() == 0, lambda: "gamma must be a 0-d tensor")
            m = scores.shape[0]
            return (torch.empty_like(scores, memory_format=torch.contiguous_format),
                    scores.new_empty(m), scores.new_empty(m),
                    scores.new_empty(m, dtype=torch.bool))

        @torch.library.register_fake("selkd::partial_ot_loss")
        def _loss_fake(student_scores, teacher_scores, target, gamma, eps, lam, method, n_iters,
                       formulation, floor):
            torch._check(student_scores.dim() == 2, lambda: "student_scores must be 2-D")
            torch._check(teacher_scores.shape == student_scores.shape,
                         lambda: "teacher_scores must have the shape of student_scores")
            torch._check(target.dim() == 1 and target.shape[0] == student_scores.shape[0],
                         lambda: "target must have one entry per row")
            torch._check(gamma.dim() == 0, lambda: "gamma must be a 0-d tensor")
            return (student_scores.new_empty(()),
                    torch.empty_like(student_scores, memory_format=torch.contiguous_format))
    except RuntimeError:
        # already registered (module reloaded in the same process)
        pass


_register_fakes()


class PartialOTCppBackend:
    name = "cpp"

    def supports(self, device: torch.device) -> bool:
        return device.type == "cpu"

    def coupling(self, scores, *, gamma, eps, method, n_iters):
        """``(log P, l, rho, sat)`` in the compute dtype (float32, or float64 for float64 input)."""
        log_p, l, rho, sat = torch.ops.selkd.partial_ot_coupling(
            scores.detach().to(V.compute_dtype(scores)), gamma, float(eps), METHOD_CODE[method],
            int(n_iters))
        return log_p, l, rho, (sat if method == "exact" else None)

    def loss_forward(self, student_scores, teacher_scores, target, *, gamma, eps, lam, method,
                     n_iters, formulation):
        """Fused open-set loss and its gradient w.r.t. ``student_scores``."""
        cd = V.compute_dtype(student_scores, teacher_scores)
        return torch.ops.selkd.partial_ot_loss(
            student_scores.detach().to(cd), teacher_scores.detach().to(cd), target, gamma,
            float(eps), float(lam), METHOD_CODE[method], int(n_iters),
            FORMULATION_CODE[formulation], _ref.NOT_SELECTED_FLOOR)


BACKEND = PartialOTCppBackend()
