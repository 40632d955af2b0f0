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
from .cost import (class_centers, classifier_centers, classifier_cost, constant_cost,
                   cost_scale, euclidean_cost, normalize_cost, random_embedding_cost,
                   superclass_cost, teacher_class_centers)
from .losses.sinkhorn_kd import SinkhornKDLoss, sinkhorn_kd_loss
from .ops.sinkhorn.api import SinkhornResult, sinkhorn, transport_plan

from ._version import __version__  # noqa: E402

__all__ = [
    "available_backends", "class_centers", "classifier_centers", "classifier_cost",
    "constant_cost", "cost_scale", "euclidean_cost", "normalize_cost",
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

# teacher assessment (paper 1, Sec. 5), transferability baselines, ranking quality
from .assessment.score import (AssessmentResult, TeacherOutputs, assess_teachers,  # noqa: E402
                               cross_validated_probe, fit_linear_probe, teacher_cost,
                               teacher_costs, transport_rows)
from .assessment.baselines import (h_score, ledoit_wolf_shrinkage, leep, logme, nce,  # noqa: E402
                                   nleep, parc, sfda, transrate)
from .assessment.ranking import (kendall, pearson, ranking_quality, top1_regret,  # noqa: E402
                                 weighted_kendall, weighted_kendall_gt)
from .losses.multi_teacher import (MultiTeacherSinkhornKDLoss, assessment_weights,
                            multi_teacher_sinkhorn_kd_loss)

__all__ += [
    "AssessmentResult", "TeacherOutputs", "assess_teachers", "cross_validated_probe",
    "fit_linear_probe", "teacher_cost", "teacher_costs", "transport_rows",
    "h_score", "ledoit_wolf_shrinkage", "leep", "logme", "nce", "nleep", "parc", "sfda",
    "transrate", "kendall", "pearson", "ranking_quality", "top1_regret", "weighted_kendall",
    "weighted_kendall_gt", "MultiTeacherSinkhornKDLoss", "assessment_weights",
    "multi_teacher_sinkhorn_kd_loss",
]

# Modules that moved when the package was laid out as ops/, losses/, assessment/, apps/: the old
# attribute names keep working for a while, with a DeprecationWarning naming the new home. A name
# whose contents were split over several modules resolves to a module holding all of them.
_MOVED_MODULES = {
    "sinkhorn_reference": ("selkd_kernels.ops.sinkhorn.reference",),
    "sinkhorn_cpp": ("selkd_kernels.ops.sinkhorn.cpp",),
    "sinkhorn_triton": ("selkd_kernels.ops.sinkhorn.triton",),
    "backends": ("selkd_kernels.ops.sinkhorn.dispatch",),
    "partial_ot_reference": ("selkd_kernels.ops.partial_ot.reference",),
    "partial_ot_cpp": ("selkd_kernels.ops.partial_ot.cpp",),
    "partial_ot_triton": ("selkd_kernels.ops.partial_ot.triton",),
    "kd_loss": ("selkd_kernels.losses.sinkhorn_kd",),
    "multi_teacher": ("selkd_kernels.losses.multi_teacher",),
    "metrics": ("selkd_kernels.assessment.baselines", "selkd_kernels.assessment.ranking"),
    "zoo": ("selkd_kernels.apps.zoo",),
    "demo": ("selkd_kernels.apps.demo",),
    "bench": ("selkd_kernels.benchmarking.cli",),
}


def __getattr__(name):
    if name not in _MOVED_MODULES:
        raise AttributeError(f"module 'selkd_kernels' has no attribute {name!r}")
    import importlib
    import types
    import warnings
    homes = _MOVED_MODULES[name]
    warnings.warn(f"selkd_kernels.{name} moved to {' and '.join(homes)}; the old name will be "
                  f"removed", DeprecationWarning, stacklevel=2)
    mods = [importlib.import_module(h) for h in homes]
    if len(mods) == 1:
        return mods[0]
    union = types.ModuleType(f"selkd_kernels.{name}")
    for mod in mods:
        union.__dict__.update({k: v for k, v in vars(mod).items() if not k.startswith("_")})
    return union
