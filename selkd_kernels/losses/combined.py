r"""One logit loss plus a weighted feature term: ``L = L_logit + feature_weight * L_feature``
(paper 2, Eq. 2 added to Eq. 10 / 14; docs/selective_kd.md, "Feature terms").

Works with every loss of the package (:class:`~selkd_kernels.SinkhornKDLoss`,
:class:`~selkd_kernels.SelKDLoss` closed or open set,
:class:`~selkd_kernels.MultiTeacherSinkhornKDLoss`) and any feature term
(:class:`~selkd_kernels.FitNetLoss`, :class:`~selkd_kernels.AttentionTransferLoss`,
:class:`~selkd_kernels.FactorTransferLoss`, or a plain function of the two feature tensors). The
logit loss is called with the positional and keyword arguments it always takes; the features go
in as ``student_features=`` / ``teacher_features=``. Learnable parts of the feature term (the
FitNet regressor, the FT translator) are submodules, so ``CombinedLoss(...).parameters()`` lists
them for the optimizer.
"""
from __future__ import annotations

import torch

from .. import _validation as V


class CombinedLoss(torch.nn.Module):
    r"""``logit_loss(*args, **kwargs) + feature_weight * feature_loss(student_features,
    teacher_features)``.

    Args:
        logit_loss: any loss module or function of the package (or a user's).
        feature_loss: a feature term (module or function of ``(student_features,
            teacher_features)``).
        feature_weight: its weight (>= 0).

    Example:
        >>> import torch, selkd_kernels as sk
        >>> crit = sk.CombinedLoss(sk.SelKDLoss([7, 2, 4]), sk.FitNetLoss(16, 64), 0.5)
        >>> zs = torch.randn(6, 3, requires_grad=True)
        >>> fs = torch.randn(6, 16, requires_grad=True)
        >>> loss = crit(zs, torch.randn(6, 10), torch.tensor([7, 2, 4, 4, 2, 7]),
        ...             student_features=fs, teacher_features=torch.randn(6, 64))
        >>> loss.backward()
    """

    def __init__(self, logit_loss, feature_loss, feature_weight: float = 1.0):
        super().__init__()
        if not callable(logit_loss):
            raise ValueError(f"logit_loss must be a loss module or function, got "
                             f"{type(logit_loss).__name__}")
        if not callable(feature_loss):
            raise ValueError(f"feature_loss must be a feature-term module or function, got "
                             f"{type(feature_loss).__name__}")
        self.logit_loss = logit_loss
        self.feature_loss = feature_loss
        self.feature_weight = V.check_nonnegative("feature_weight", feature_weight)

    def forward(self, *args, student_features, teacher_features, **kwargs):
        loss = self.logit_loss(*args, **kwargs)
        if self.feature_weight == 0.0:
            return loss
        return loss + self.feature_weight * self.feature_loss(student_features, teacher_features)

    def extra_repr(self):
        return f"feature_weight={self.feature_weight}"
