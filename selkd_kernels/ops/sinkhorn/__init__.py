"""Batched entropic optimal transport with a shared or per-row cost (paper 1, Eq. 5, 12; Alg. 3).

``reference`` defines the answer, ``cpp`` and ``triton`` are the compiled backends, ``api`` holds
:func:`sinkhorn`. The maths is written out in ``docs/ops/sinkhorn.md``.
"""
from .api import SinkhornResult, sinkhorn, transport_plan

__all__ = ["SinkhornResult", "sinkhorn", "transport_plan"]
