"""Module names from before the ops/, losses/, assessment/, apps/ layout still resolve, with a
DeprecationWarning that names the new home."""
import importlib

import pytest

import selkd_kernels as sk

# old attribute -> a name the module must still provide
OLD = {
    "sinkhorn_reference": "solve", "backends": "get_backend",
    "partial_ot_reference": "log_coupling", "kd_loss": "SinkhornKDLoss",
    "multi_teacher": "MultiTeacherSinkhornKDLoss",
    "zoo": "ZooConfig", "demo": "main", "bench": "main",
}


@pytest.mark.parametrize("old,attr", sorted(OLD.items()))
def test_old_module_names_warn_and_resolve(old, attr):
    with pytest.warns(DeprecationWarning, match=rf"selkd_kernels\.{old} moved to "):
        mod = getattr(sk, old)
    assert mod is importlib.import_module(sk._MOVED_MODULES[old][0])
    assert hasattr(mod, attr)


def test_old_metrics_module_holds_the_baselines_and_the_ranking_measures():
    with pytest.warns(DeprecationWarning, match="assessment.baselines and "):
        metrics = sk.metrics
    assert metrics.nce is sk.nce and metrics.logme is sk.logme
    assert metrics.pearson is sk.pearson and metrics.ranking_quality is sk.ranking_quality


def test_unknown_attributes_still_raise():
    with pytest.raises(AttributeError, match="no_such_name"):
        sk.no_such_name  # noqa: B018
