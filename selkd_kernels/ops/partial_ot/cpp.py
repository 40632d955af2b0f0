"""C++ CPU backend for the open-set coupling (ops ``selkd::partial_ot_coupling`` and
``selkd::partial_ot_loss`` from ``csrc/partial_ot_cpu.cpp``, built into ``selkd_kernels._C``).

Importing this module fails (and the "cpp" backend is then simply unavailable) when the extension
is not built or was built without these ops.
"""
from __future__ import annotations

import torch

from ... import _extension
from ... import _validation as V

_extension.require_ops("partial_ot_coupling", "partial_ot_loss")

_METHOD_CODE = {"exact": 0, "bregman": 1}


def _register_fakes():
    # shape-only implementations so torch.compile / FakeTensor tracing can see through the ops
    lib = "selkd::partial_ot_coupling"
    try:
        @torch.library.register_fake(lib)
        def _coupling_fake(scores, gamma, eps, method, n_iters):
            m = scores.shape[0]
            return (torch.empty_like(scores), scores.new_empty(m), scores.new_empty(m),
                    scores.new_empty(m, dtype=torch.bool))

        @torch.library.register_fake("selkd::partial_ot_loss")
        def _loss_fake(student_scores, teacher_scores, target, gamma, eps, lam, method, n_iters):
            return student_scores.new_empty(()), torch.empty_like(student_scores)
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
            scores.to(V.compute_dtype(scores)), float(gamma), float(eps), _METHOD_CODE[method],
            int(n_iters))
        return log_p, l, rho, (sat if method == "exact" else None)

    def loss_forward(self, student_scores, teacher_scores, target, *, gamma, eps, lam, method,
                     n_iters):
        """Fused open-set loss and its gradient w.r.t. ``student_scores``."""
        cd = V.compute_dtype(student_scores, teacher_scores)
        return torch.ops.selkd.partial_ot_loss(student_scores.to(cd), teacher_scores.to(cd),
                                               target, float(gamma), float(eps), float(lam),
                                               _METHOD_CODE[method], int(n_iters))


BACKEND = PartialOTCppBackend()
