"""selkd-kernels: fused optimal-transport losses for cross-task and selective knowledge
distillation in PyTorch.

Main entry points::

    import selkd_kernels as sk
    r = sk.sinkhorn(a, b, cost, eps=0.1)                   # batched entropic OT
    loss = sk.sinkhorn_kd_loss(z_s, z_t, cost, tau=3.0)    # Sinkhorn KD loss (paper 1, Eq. 12)
    crit = sk.SinkhornKDLoss(cost, tau=3.0, eps=0.1, weight=10.0)   # Eq. 11 with CE
    cost = sk.euclidean_cost(sk.teacher_class_centers(W), sk.class_centers(phi, y, C_S))
"""
from .backends import available_backends
from .cost import (class_centers, constant_cost, euclidean_cost, normalize_cost,
                   random_embedding_cost, superclass_cost, teacher_class_centers)
from .kd_loss import SinkhornKDLoss, sinkhorn_kd_loss
from .sinkhorn import SinkhornResult, sinkhorn, transport_plan

__version__ = "0.1.0"

__all__ = [
    "available_backends", "class_centers", "constant_cost", "euclidean_cost", "normalize_cost",
    "random_embedding_cost", "superclass_cost", "teacher_class_centers", "SinkhornKDLoss",
    "sinkhorn_kd_loss", "SinkhornResult", "sinkhorn", "transport_plan", "__version__",
]
