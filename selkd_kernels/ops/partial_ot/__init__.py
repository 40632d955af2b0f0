"""Open-set coupling of Selective KD: the KL projection onto {P 1 <= 1, 1'P1 = gamma}
(paper 2, Eq. 12-14, Alg. 1).

``reference`` defines the answer, ``cpp`` and ``triton`` are the compiled backends, ``api`` holds
:func:`partial_ot`. The maths is written out in ``docs/ops/partial_ot.md``.
"""
from .api import available_partial_ot_backends, partial_ot

__all__ = ["available_partial_ot_backends", "partial_ot"]
