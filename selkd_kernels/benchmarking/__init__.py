"""Benchmark harness: canonical workloads and sweeps (docs/benchmarks.md), providers for every
implementation under comparison, a timer with robust statistics, and result reports.

The ``selkd bench`` command (:mod:`selkd_kernels.benchmarking.cli`) and the pytest-benchmark suite in
``benchmarks/`` are both thin layers over this package, so they time the same calls.
"""
from .providers import (ALL_OPS, OPS_BY_KIND, Context, NotApplicable, Prepared, Provider,
                        providers_for, select)
from .runner import Point, RunConfig, Runner, points_for_sweep, points_for_workloads
from .timer import Timer, TimingStats, measure_peak_memory, percentile
from .workloads import (DEFAULT_WORKLOADS, QUICK_WORKLOADS, SWEEPS, WORKLOADS, Sweep, Workload,
                        make_inputs)

__all__ = [
    "ALL_OPS", "OPS_BY_KIND", "Context", "NotApplicable", "Prepared", "Provider", "providers_for",
    "select", "Point", "RunConfig", "Runner", "points_for_sweep", "points_for_workloads", "Timer",
    "TimingStats", "measure_peak_memory", "percentile", "DEFAULT_WORKLOADS", "QUICK_WORKLOADS",
    "SWEEPS", "WORKLOADS", "Sweep", "Workload", "make_inputs",
]
