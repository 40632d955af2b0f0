r"""Distillation from several cross-task teachers at once (paper 1, Sec. 7, "future work").

Paper 1 notes that several teachers can be distilled by adding one Sinkhorn term per teacher,
and suggests weighting the terms by the teachers' assessment scores. We use

    L = CE(y, z_S) + lambda * sum_h w_h * mean_i S_eps(softmax(z_h,i / tau), softmax(z_S,i / tau); M_h)

    w = softmax(-scores / temperature)

with ``scores`` the Eq. 24 values of :func:`selkd_kernels.assess_teachers` (lower is better, hence
the minus sign). The weights sum to 1, so ``lambda`` keeps the meaning it has for one teacher;
``temperature -> 0`` recovers single-teacher distillation from the best-assessed teacher and a
large temperature the uniform average. The temperature is in the units of the score: Sinkhorn
scores of related and unrelated teachers typically differ by a few tenths at eps = 0.1, so the
default 0.1 separates them clearly without discarding the runner-up entirely.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .. import _validation as V
from ..ops.registry import check_backend_name
from .sinkhorn_kd import plus_cross_entropy, sinkhorn_kd_loss


def assessment_weights(scores, temperature: float = 0.1) -> torch.Tensor:
    """``softmax(-scores / temperature)``: per-teacher weights from lower-is-better scores.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> w = sk.assessment_weights(torch.tensor([0.2, 0.3, 1.0]), temperature=0.1)
        >>> [round(float(x), 3) for x in w]           # the lowest score weighs most
        [0.731, 0.269, 0.0]
    """
    s = torch.as_tensor(scores, dtype=torch.float64).detach()
    if s.dim() != 1 or s.numel() == 0:
        raise ValueError("scores must be a non-empty 1-D sequence, one per teacher")
    if not bool(torch.isfinite(s).all()):
        raise ValueError("scores contains NaN or inf")
    temperature = V.check_positive("temperature", temperature)
    return torch.softmax(-s / temperature, dim=0)


def _check_weights(weights, h) -> list:
    """The per-teacher weights as Python floats (a traced graph takes them as constants)."""
    w = torch.as_tensor(weights, dtype=torch.float64).detach()
    if w.dim() != 1 or w.numel() != h:
        raise ValueError(f"weights must hold one entry per teacher ({h}), got shape "
                         f"{tuple(w.shape)}")
    out = w.tolist()
    if not all(0 <= x < math.inf for x in out):
        raise ValueError("weights must be finite and non-negative")
    return out


def multi_teacher_sinkhorn_kd_loss(student_logits: torch.Tensor,
                                   teacher_logits: Sequence[torch.Tensor],
                                   costs: Sequence[torch.Tensor], weights, *, tau: float = 3.0,
                                   eps: float = 0.1, n_iters: int = 100,
                                   tol: Optional[float] = None, backend: str = "auto"
                                   ) -> torch.Tensor:
    r"""``sum_h weights[h] * mean_i S_eps(p_h,i, p_S,i; M_h)``.

    Args:
        student_logits: (B, C_S).
        teacher_logits: one (B, C_h) tensor per teacher (class counts may differ).
        costs: one (C_h, C_S) cost per teacher.
        weights: (H,) non-negative weights, e.g. :func:`assessment_weights`. A zero weight skips
            that teacher's solve.
        tau, eps, n_iters, tol, backend: as in :func:`selkd_kernels.sinkhorn_kd_loss`.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> student = torch.randn(4, 5, requires_grad=True)
        >>> teachers = [torch.randn(4, 7), torch.randn(4, 3)]     # class counts differ
        >>> costs = [sk.cost.euclidean_cost(torch.randn(c, 8), torch.randn(5, 8)) for c in (7, 3)]
        >>> w = torch.tensor([0.75, 0.25])
        >>> loss = sk.multi_teacher_sinkhorn_kd_loss(student, teachers, costs, w)
        >>> loss.backward()
        >>> parts = [sk.sinkhorn_kd_loss(student, t, c) for t, c in zip(teachers, costs)]
        >>> bool(torch.allclose(loss, 0.75 * parts[0] + 0.25 * parts[1]))
        True
    """
    if not isinstance(teacher_logits, (list, tuple)) or not teacher_logits:
        raise ValueError("teacher_logits must be a non-empty list, one tensor per teacher")
    if not isinstance(costs, (list, tuple)) or len(costs) != len(teacher_logits):
        raise ValueError(f"costs must be a list with one cost per teacher "
                         f"({len(teacher_logits)})")
    # a module passes its validated weights as floats; other values are checked (one read)
    w = list(weights) if _as_floats(weights, len(teacher_logits)) else \
        _check_weights(weights, len(teacher_logits))
    total = student_logits.new_zeros(())
    for h, (z_t, m) in enumerate(zip(teacher_logits, costs)):
        if w[h] == 0.0:
            continue
        s = sinkhorn_kd_loss(student_logits, z_t, m, tau=tau, eps=eps, n_iters=n_iters, tol=tol,
                             reduction="mean", backend=backend)
        total = total + w[h] * s
    return total


def _as_floats(weights, h) -> bool:
    return isinstance(weights, tuple) and len(weights) == h and all(
        type(x) is float and 0 <= x < math.inf for x in weights)


class MultiTeacherSinkhornKDLoss(torch.nn.Module):
    r"""``CE(y, z_S) + weight * sum_h w_h S_h`` with ``w = softmax(-scores / temperature)``
    (see the module docstring), or explicit ``weights``.

    Args:
        costs: one (C_h, C_S) cost per teacher (stored as buffers ``cost_0``, ``cost_1``, ...).
        scores: Eq. 24 scores of the teachers (lower is better); or
        weights: explicit non-negative per-teacher weights (exactly one of the two).
        temperature: of the softmax over ``-scores``.
        tau, eps, weight, n_iters, tol, backend: as in :class:`selkd_kernels.SinkhornKDLoss`.

    ``forward(student_logits, teacher_logits_list, target=None)``. The weights in use, given or
    computed, are kept in the ``teacher_weights`` buffer.

    Example:
        >>> import torch, selkd_kernels as sk
        >>> costs = [sk.cost.euclidean_cost(torch.randn(c, 8), torch.randn(5, 8)) for c in (7, 3)]
        >>> kd = sk.MultiTeacherSinkhornKDLoss(costs, scores=torch.tensor([0.2, 0.9]))
        >>> [round(float(w), 3) for w in kd.teacher_weights]  # softmax(-scores / temperature)
        [0.999, 0.001]
        >>> student = torch.randn(4, 5, requires_grad=True)
        >>> loss = kd(student, [torch.randn(4, 7), torch.randn(4, 3)], torch.tensor([0, 1, 2, 4]))
        >>> loss.backward()
        >>> tuple(student.grad.shape)
        (4, 5)
    """

    def __init__(self, costs: Sequence[torch.Tensor], scores=None, weights=None,
                 temperature: float = 0.1, tau: float = 3.0, eps: float = 0.1,
                 weight: float = 10.0, n_iters: int = 100, tol: Optional[float] = None,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(costs, (list, tuple)) or not costs:
            raise ValueError("costs must be a non-empty list of (C_h, C_S) cost matrices")
        c_s = None
        for h, m in enumerate(costs):
            V.check_tensor(f"costs[{h}]", m, (2,))
            if c_s is not None and m.shape[1] != c_s:
                raise ValueError(f"costs[{h}] has {m.shape[1]} student classes, costs[0] has "
                                 f"{c_s}")
            c_s = m.shape[1]
            self.register_buffer(f"cost_{h}", m.detach().clone())
        self.num_teachers = len(costs)
        if (scores is None) == (weights is None):
            raise ValueError("scores: give exactly one of scores or weights")
        if scores is not None:
            if len(scores) != self.num_teachers:
                raise ValueError(f"scores has {len(scores)} entries for {self.num_teachers} "
                                 f"teachers")
            w = assessment_weights(scores, temperature)
        else:
            w = _check_weights(weights, self.num_teachers)
        self.register_buffer("teacher_weights", torch.as_tensor(w, dtype=torch.float64).float())
        self._weights = tuple(float(x) for x in self.teacher_weights.tolist())
        # the widest compute dtype here; each call checks again against its own
        self.tau = V.check_representable("tau", tau, torch.float64)
        self.eps = V.check_representable("eps", eps, torch.float64)
        self.weight = V.check_nonnegative("weight", weight)
        self.n_iters = V.check_positive_int("n_iters", n_iters)
        self.tol = V.check_optional_positive("tol", tol)
        self.backend = check_backend_name(backend)

    def _current_weights(self) -> tuple:
        # the buffer is what state_dict() saves and loads; traced code cannot read its values
        # and uses the floats taken when it was last read eagerly
        if not torch.compiler.is_compiling():
            self._weights = tuple(float(x) for x in self.teacher_weights.tolist())
        return self._weights

    @property
    def costs(self):
        return [getattr(self, f"cost_{h}") for h in range(self.num_teachers)]

    def forward(self, student_logits, teacher_logits, target=None):
        if not isinstance(teacher_logits, (list, tuple)) or \
                len(teacher_logits) != self.num_teachers:
            raise ValueError(f"teacher_logits must be a list of {self.num_teachers} tensors")
        loss = self.weight * multi_teacher_sinkhorn_kd_loss(
            student_logits, teacher_logits, self.costs, self._current_weights(), tau=self.tau,
            eps=self.eps, n_iters=self.n_iters, tol=self.tol, backend=self.backend)
        return plus_cross_entropy(loss, student_logits, target)

    def extra_repr(self):
        w = ", ".join(f"{float(x):.3f}" for x in self.teacher_weights)
        return f"teachers={self.num_teachers}, weights=[{w}], tau={self.tau}, eps={self.eps}, " \
               f"weight={self.weight}"
