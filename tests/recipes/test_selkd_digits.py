"""Smoke run of the Selective KD recipe on scikit-learn's digits (recipes/selkd_digits.py)."""
import importlib.util
import json
import math
import os

import pytest

pytest.importorskip("sklearn")

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "selkd_digits.py")


def test_quick_run_writes_table(tmp_path):
    spec = importlib.util.spec_from_file_location("selkd_digits", RECIPE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "res.json"
    mod.main(["--quick", "--no-progress", "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res["closed_set"]) == set(mod.CLOSED_METHODS)
    assert set(res["open_set"]) == set(mod.OPEN_ROWS)
    n_sub = len(res["subtasks"])
    for d in res["closed_set"].values():
        assert len(d["acc"]["per_subtask"]) == n_sub and 0 <= d["acc"]["mean"] <= 100
    for d in res["open_set"].values():
        for key in ("closed_acc", "open_acc", "auroc"):
            assert 0 <= d[key]["mean"] <= 100 and not math.isnan(d[key]["mean"])
