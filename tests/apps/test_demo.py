"""The demo pipeline on a tiny zoo: report fields, recomputability of every figure from the
per-teacher values it stores, plots, and the CLI's help and checks."""
import json

import numpy as np
import pytest

from selkd_kernels import cli
from selkd_kernels.apps import demo
from selkd_kernels.apps.evaluation import BASELINES, HIGHER_IS_BETTER, ORACLE, OURS
from selkd_kernels.apps.report import bootstrap, unit_quality
from selkd_kernels.assessment import ranking as R
from tests.apps.test_zoo import tiny_config


def _overrides():
    cfg = tiny_config()
    return {k: getattr(cfg, k) for k in ("window_size", "window_step", "families", "shots",
                                         "pool_per_class", "val_per_class", "student_hidden",
                                         "student_epochs", "kd_weights", "student_seeds",
                                         "synthetic", "sinkhorn_iters")} | {"tasks": (0, 2)}


@pytest.fixture(scope="module")
def res(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo_cache")
    return demo.run_dataset("synthetic", [0, 1], False, str(cache), False, 200,
                            overrides=_overrides())


def test_units_cover_tasks_seeds_and_metrics(res):
    units = res["units"]
    assert len(units) == 2 * 2 and {u["seed"] for u in units} == {0, 1}
    metrics = set(OURS) | set(BASELINES) | {ORACLE}
    for u in units:
        assert set(u["scores"]) == metrics
        assert all(len(v) == len(u["teachers"]) for v in u["scores"].values())
        assert sorted({t["overlap"] for t in u["teachers"]}) == [0.0, 0.5, 1.0]
        assert 0 <= u["chosen"] < len(u["teachers"])
    s = res["summary"]
    assert s["units"] == 4 and set(s["ranking"]) == metrics
    assert sum(s["lambda_counts"].values()) == sum(len(u["teachers"]) for u in units)
    assert set(s["fig5"]) == {"1.00", "0.50", "0.00"} and s["nmi"]
    assert set(s["distil_or_not"]["gain_over_no_teacher"]) == {
        "always", "assessment-gated", "validation-gated", "oracle"}
    assert len(s["sensitivity"]) == 2 * 13
    assert s["best_of_ours_by_kendall"] in OURS


def test_every_figure_is_recomputable_from_the_units(res):
    units, s = res["units"], res["summary"]
    for m in OURS:
        per = [unit_quality(u)[m]["kendall"] for u in units]
        assert s["ranking"][m]["kendall"] == bootstrap(per, 200)
        # and the per-unit value is scipy's Kendall of the oriented stored scores
        u = units[0]
        acc = [t["acc"] for t in u["teachers"]]
        q = np.array(u["scores"][m]) * (1 if HIGHER_IS_BETTER[m] else -1)
        assert per[0] == pytest.approx(R.kendall(q, acc), nan_ok=True)
    oracle = [R.pearson(u["scores"][ORACLE], [t["acc"] for t in u["teachers"]]) for u in units]
    assert s["ranking"][ORACLE]["pearson"]["mean"] == pytest.approx(np.nanmean(oracle))
    gains = [u["teachers"][u["chosen"]]["acc"] - u["no_teacher"]["acc"] for u in units]
    assert s["distil_or_not"]["gain_over_no_teacher"]["always"]["mean"] == pytest.approx(
        np.mean(gains))


def test_bootstrap_interval_contains_the_mean_and_is_deterministic():
    b = bootstrap([0.1, 0.4, 0.2, 0.9, 0.5], boot=500)
    assert b["ci"][0] <= b["mean"] <= b["ci"][1] and b["n"] == 5
    assert b == bootstrap([0.1, 0.4, 0.2, 0.9, 0.5], boot=500)
    assert bootstrap([float("nan")], boot=10)["mean"] is None


def test_text_and_plots(res, tmp_path):
    txt = demo.format_ranking(res) + demo.format_paired(res) + demo.format_other(res)
    assert "Pearson" in txt and "split-half" in txt and "Distil or not" in txt
    paths = demo.plots(res, str(tmp_path))
    assert len(paths) == 2 and all((tmp_path / p.split("/")[-1]).stat().st_size > 0
                                   for p in paths)
    json.dumps(res, default=float)  # the report is plain JSON


def test_cli_help_shows_defaults_and_examples(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    assert "(default: 2000)" in out and "examples:" in out and "``" not in out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--dataset", "nope"])


def test_cli_checks_extras_up_front(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(SystemExit, match=r"selkd-kernels\[demo\]"):
        demo.main(["--quick", "--no-progress"])


@pytest.mark.slow
def test_quick_cli_end_to_end(tmp_path):
    rc = cli.main(["demo", "--quick", "--seeds", "1", "--jobs", "1", "--out", str(tmp_path),
                   "--no-cache", "--no-progress"])
    assert rc == 0
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["quick"] and rep["datasets"][0]["dataset"] == "synthetic"
    assert all((tmp_path / p).stat().st_size > 0 for p in rep["plots"])
