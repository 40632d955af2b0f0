"""``selkd demo --quick`` end to end through the console-script entry point."""
import json
import os

import numpy as np
import pytest
from scipy import stats

from selkd_kernels import cli
from selkd_kernels.apps.demo import BASELINES, HIGHER_IS_BETTER, OURS, OURS_VARIANTS


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_out")
    cache = tmp_path_factory.mktemp("demo_cache")
    rc = cli.main(["demo", "--quick", "--out", str(out), "--cache", str(cache), "--no-progress"])
    assert rc == 0
    with open(out / "report.json") as f:
        rep = json.load(f)
    return rep, out, cache


def test_report_fields_and_plots(report):
    rep, out, cache = report
    assert rep["quick"] is True
    assert "lower-better" in rep["sign_convention"]
    assert len(rep["datasets"]) == 1
    ds = rep["datasets"][0]
    assert ds["dataset"] == "synthetic"
    metrics = set(OURS_VARIANTS) | set(BASELINES)
    assert set(ds["correlation_mean"]) == metrics
    assert set(ds["seconds_per_teacher"]) >= metrics
    n_teachers = len(ds["zoo"]["teachers"])
    assert n_teachers == 8
    for t in ds["tasks"]:
        assert len(t["teachers"]) == n_teachers
        assert set(t["scores"]) == metrics
        assert all(len(v) == n_teachers for v in t["scores"].values())
        assert set(t["correlation"][OURS]) == {"pearson", "kendall", "weighted_kendall",
                                               "top1_regret"}
        assert t["assessment"]["best_name"] == t["chosen"][OURS]
    assert [r["overlap"] for r in sorted(ds["overlap"], key=lambda r: -r["overlap"])][0] == 1.0
    assert ds["nmi"] and all(0 <= r["teacher"] <= 1 and 0 <= r["random"] <= 1 for r in ds["nmi"])
    fin = ds["final_distillation"]
    assert 0 < fin["student_acc_chosen_teacher"] <= 1
    assert abs(sum(fin["multi_teacher_weights"]) - 1) < 1e-5
    for p in rep["plots"]:
        assert (out / p).stat().st_size > 0
    assert any(f.endswith(".pt") for f in os.listdir(cache))


def test_correlations_recomputable_from_reported_values(report):
    ds = report[0]["datasets"][0]
    for t in ds["tasks"]:
        acc = np.array([tt["student_acc"] for tt in t["teachers"]])
        for m, s in t["scores"].items():
            q = np.array(s) if HIGHER_IS_BETTER[m] else -np.array(s)
            c = t["correlation"][m]
            if np.ptp(q) > 0:
                assert c["pearson"] == pytest.approx(stats.pearsonr(q, acc)[0], abs=1e-9)
            assert c["kendall"] == pytest.approx(stats.kendalltau(q, acc)[0], abs=1e-9)
            assert c["top1_regret"] == pytest.approx(acc.max() - acc[np.argmax(q)], abs=1e-12)
    for m, summ in ds["correlation_mean"].items():
        want = np.nanmean([t["correlation"][m]["pearson"] for t in ds["tasks"]])
        assert summ["pearson"] == pytest.approx(want, abs=1e-12)


def test_our_metric_is_informative(report):
    ds = report[0]["datasets"][0]
    # not a claim that it wins: only that it is informative on this zoo (fixed seeds)
    assert ds["correlation_mean"][OURS]["kendall"] > 0


def test_bad_arguments():
    with pytest.raises(SystemExit):
        cli.main(["demo", "--dataset", "nope"])


def test_sliding_windows_and_config_validation():
    from selkd_kernels.apps.zoo import ZooConfig, sliding_windows
    w = sliding_windows(list(range(10)), 6, 1)
    assert len(w) == 5 and w[0] == [0, 1, 2, 3, 4, 5] and w[-1] == [4, 5, 6, 7, 8, 9]
    assert len(sliding_windows(list(range(40)), 20, 5)) == 5  # paper 1's 5 windows per family
    with pytest.raises(ValueError, match="window_size"):
        sliding_windows(list(range(5)), 6, 1)
    with pytest.raises(ValueError, match="dataset"):
        ZooConfig(dataset="cifar")
    with pytest.raises(ValueError, match="student_seeds"):
        ZooConfig(student_seeds=0)
    assert ZooConfig.preset("synthetic", quick=True).key() != ZooConfig.preset("synthetic").key()
