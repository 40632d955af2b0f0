"""selkd-kernels: fused optimal-transport losses for cross-task and selective knowledge
distillation in PyTorch.

Main entry points::

    import selkd_kernels as sk
    r = sk.sinkhorn(a, b, cost, eps=0.1)                   # batched entropic OT
    loss = sk.sinkhorn_kd_loss(z_s, z_t, cost, tau=3.0)    # Sinkhorn KD loss (paper 1, Eq. 12)
    crit = sk.SinkhornKDLoss(cost, tau=3.0, eps=0.1, weight=10.0)   # Eq. 11 with CE
    cost = sk.euclidean_cost(sk.teacher_class_centers(W), sk.class_centers(phi, y, C_S))
"""
from .ops.sinkhorn.dispatch import available_backends
from .cost import (class_centers, constant_cost, euclidean_cost, normalize_cost,
                   random_embedding_cost, superclass_cost, teacher_class_centers)
from .losses.sinkhorn_kd import SinkhornKDLoss, sinkhorn_kd_loss
from .ops.sinkhorn.api import SinkhornResult, sinkhorn, transport_plan

__version__ = "0.1.0"

__all__ = [
    "available_backends", "class_centers", "constant_cost", "euclidean_cost", "normalize_cost",
    "random_embedding_cost", "superclass_cost", "teacher_class_centers", "SinkhornKDLoss",
    "sinkhorn_kd_loss", "SinkhornResult", "sinkhorn", "transport_plan", "__version__",
]

# Selective KD (paper 2): partial-OT coupling, closed/open-set losses (both open-set
# formulations), feature terms and their composition, prediction, test-time gamma, metrics
from .ops.partial_ot.api import available_partial_ot_backends, partial_ot  # noqa: E402
from .losses.selkd import (SelKDLoss, closed_set_selkd_loss, local_labels,  # noqa: E402
                           open_set_selkd_loss, open_set_teacher_logits, open_set_teacher_scores,
                           selkd_loss)
from .losses.selkd_inference import (SelKDPrediction, auroc, balanced_accuracy,  # noqa: E402
                                     em_selected_fraction, fpr_at_tpr, selected_posterior,
                                     selkd_log_kappa, selkd_metrics, selkd_predict)
from .losses.features import (AttentionTransferLoss, FactorTransferLoss, FitNetLoss,  # noqa: E402
                              attention_map, attention_transfer_loss, factor_transfer_loss,
                              fitnet_loss)
from .losses.combined import CombinedLoss  # noqa: E402

__all__ += [
    "available_partial_ot_backends", "partial_ot", "SelKDLoss", "closed_set_selkd_loss",
    "local_labels", "open_set_selkd_loss", "open_set_teacher_logits", "open_set_teacher_scores",
    "selkd_loss", "SelKDPrediction", "auroc", "balanced_accuracy", "em_selected_fraction",
    "fpr_at_tpr", "selected_posterior", "selkd_log_kappa", "selkd_metrics", "selkd_predict",
    "AttentionTransferLoss", "FactorTransferLoss", "FitNetLoss", "attention_map",
    "attention_transfer_loss", "factor_transfer_loss", "fitnet_loss", "CombinedLoss",
]

# teacher assessment, transferability baselines, multi-teacher distillation (issue 5)
from .assessment.score import (AssessmentResult, TeacherOutputs, assess_teachers, fit_linear_probe,
                         teacher_cost)
from .assessment.baselines import (h_score, kendall, leep, logme, nce, pearson, ranking_quality, top1_regret,
                      weighted_kendall)
from .losses.multi_teacher import (MultiTeacherSinkhornKDLoss, assessment_weights,
                            multi_teacher_sinkhorn_kd_loss)

__all__ += [
    "AssessmentResult", "TeacherOutputs", "assess_teachers", "fit_linear_probe", "teacher_cost",
    "h_score", "kendall", "leep", "logme", "nce", "pearson", "ranking_quality", "top1_regret",
    "weighted_kendall", "MultiTeacherSinkhornKDLoss", "assessment_weights",
    "multi_teacher_sinkhorn_kd_loss",
]
