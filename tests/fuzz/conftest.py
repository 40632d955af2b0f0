"""Hypothesis profiles of the fuzz suite (docs/guarantees.md, "Fuzzing").

* ``ci`` (default): a fixed number of examples per test and ``derandomize=True``, so every run
  draws the same cases and a failure reproduces exactly; about a minute on a loaded 2-core machine.
* ``long``: ten times the examples, randomised (a fresh draw each run); selected with
  ``SELKD_FUZZ_PROFILE=long``.

Tests marked ``slow`` are long-budget variants of the fast ones; they run only when asked for
(``python -m pytest tests/fuzz -m slow``), never in the default run.
"""
import os

import pytest
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("ci", derandomize=True, **_COMMON)
settings.register_profile("long", derandomize=False, **_COMMON)
PROFILE = os.environ.get("SELKD_FUZZ_PROFILE", "ci")
settings.load_profile(PROFILE)


def pytest_collection_modifyitems(config, items):
    if "slow" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="long fuzz budget: run with -m slow")
    here = os.path.dirname(__file__)
    for item in items:
        if "slow" in item.keywords and str(item.fspath).startswith(here):
            item.add_marker(skip)
