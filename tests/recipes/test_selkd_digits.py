"""The Selective KD recipe on scikit-learn's digits (recipes/selkd_digits.py): a smoke run that
writes the full table, and its building blocks (labelled split, intervals)."""
import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "selkd_digits.py")


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("selkd_digits", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_quick_run_writes_every_row(recipe, tmp_path):
    out = tmp_path / "res.json"
    recipe.main(["--quick", "--no-progress", "--out", str(out)])
    res = json.loads(out.read_text())
    names = {(r["setting"], r["formulation"], r["method"], r["feature"], r["rule"])
             for r in res["rows"]}
    grid = [("no-KD", "none")] + [(m, f) for m in ("KD", "SelKD") for f in recipe.FEATURES]
    want = {("closed", None, m, f, "argmax") for m, f in grid}
    want |= {("open", form, m, f, rule) for form in ("paper", "consistent")
             for rule in recipe.RULES for m, f in grid}
    assert names == want
    for r in res["rows"]:
        metrics = ("closed_acc",) if r["setting"] == "closed" else \
            ("closed_acc", "balanced_open_acc", "auroc", "fpr_at_95_tpr")
        for key in metrics:
            assert 0 <= r[key]["mean"] <= 100 and r[key]["n"] == 1, (r, key)
    assert set(res["teacher_test_acc"]) == {"comprehensive", "per-subtask closed",
                                            "per-subtask open"}
    assert res["cpu_s"] > 0 and res["feature_weights"]["at"] == 1000 / 16
    assert any(d["metric"] == "auroc" for d in res["paired_selkd_minus_kd"])
    closed, open_ = recipe.markdown(res).split("\n\n")
    for table, cols in ((closed, 4), (open_, 6)):
        lines = table.splitlines()
        assert len(lines) == 2 + len(grid) and all(ln.count("|") == cols + 1 for ln in lines)
    # paper 2's numbers sit in their rows, "-" where it has no such row
    assert "| SelKD | ft | 95.09 |" in closed and "| KD | none | - |" in closed
    assert "| no-KD | none | 82.30 |" in open_ and "| SelKD | none | - |" in open_


def test_labelled_split_is_stratified_and_disjoint(recipe):
    y = torch.arange(10).repeat_interleave(40)
    lab, pool = recipe.labelled_split(y, 0.05, seed=3)
    assert torch.bincount(y[lab], minlength=10).tolist() == [2] * 10
    assert set(lab.tolist()).isdisjoint(pool.tolist())
    assert lab.numel() + pool.numel() == y.numel()
    again, _ = recipe.labelled_split(y, 0.05, seed=3)
    assert torch.equal(lab, again)


def test_interval_is_a_t_interval(recipe):
    v = [0.80, 0.84, 0.79, 0.83, 0.81]
    got = recipe.interval(v)
    sd = np.std(100 * np.array(v), ddof=1)
    assert got["mean"] == pytest.approx(81.4)
    assert got["ci95"] == pytest.approx(round(2.7764451 * sd / math.sqrt(5), 2), abs=0.01)
    assert math.isnan(recipe.interval([0.5])["ci95"])
