"""Fixtures of the pytest-benchmark suite; the machinery is in ``bench_support.py`` (a module name
that cannot clash with ``tests/conftest.py`` when both directories are collected together)."""
from bench_support import run_provider  # noqa: F401  (pytest finds the fixture here)
