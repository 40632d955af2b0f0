"""Support for the pytest-benchmark suite: a front end to :mod:`selkd_kernels.benchmarking`.

The providers, inputs, memory guards and agreement check are the package harness's, so these
benchmarks time exactly the calls ``selkd bench`` times; pytest-benchmark does the timing and the
statistics here. Settings come from the environment (pytest options would clash with other
plugins' names):

* ``SELKD_BENCH_WORKLOADS``: comma-separated workload names (default: all of the op's kind).
* ``SELKD_BENCH_QUICK=1``: the small twins of the workloads (smoke test, no timing claims).
* ``SELKD_BENCH_ROUNDS`` (default 10), ``SELKD_BENCH_BUDGET`` seconds per benchmark (default 60):
  slower providers get fewer rounds.
* ``SELKD_BENCH_MEM_CAP_GB`` (default 8): skip providers whose (B, m, n) temporaries exceed it.
* ``SELKD_BENCH_MAX_CALL_S`` (default 60): on large problems, skip providers whose single call a
  2-iteration probe extrapolates beyond this.
* ``SELKD_BENCH_DEVICE``: cpu or cuda (default: cuda when available).
* ``SELKD_BENCH_THREADS``: torch intra-op threads (default: torch's choice).
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from selkd_kernels.ops.sinkhorn import reference as _ref
from selkd_kernels.benchmarking import providers as P
from selkd_kernels.benchmarking.runner import AGREEMENT_RTOL, RunConfig, Runner
from selkd_kernels.benchmarking.workloads import (QUICK_WORKLOADS, WORKLOADS, make_inputs)

DEVICE = torch.device(os.environ.get("SELKD_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
QUICK = os.environ.get("SELKD_BENCH_QUICK", "") not in ("", "0")
ROUNDS = int(os.environ.get("SELKD_BENCH_ROUNDS", "10"))
BUDGET_S = float(os.environ.get("SELKD_BENCH_BUDGET", "60"))
MEM_CAP = float(os.environ.get("SELKD_BENCH_MEM_CAP_GB", "8")) * 2 ** 30
if os.environ.get("SELKD_BENCH_THREADS"):
    torch.set_num_threads(int(os.environ["SELKD_BENCH_THREADS"]))
CTX = P.Context(device=DEVICE, quick=QUICK, compile_backend="aot_eager" if QUICK else "inductor")
# the CLI's runner, used here only for its probe of very slow providers
_PROBE = Runner(RunConfig(device=DEVICE, quick=QUICK,
                          max_call_s=float(os.environ.get("SELKD_BENCH_MAX_CALL_S", "60"))))


def workloads_of(kind: str) -> list[str]:
    table = QUICK_WORKLOADS if QUICK else WORKLOADS
    names = [n for n in os.environ.get("SELKD_BENCH_WORKLOADS", "").split(",") if n]
    return [n for n in (names or table) if n in table and table[n].kind == kind]


def provider_names(op: str) -> list[str]:
    return [p.name for p in P.providers_for(op, DEVICE)]


_INPUTS: dict = {}
_REF_VALUES: dict = {}


def _inputs(workload):
    key = (workload.name, QUICK)
    if key not in _INPUTS:
        _INPUTS.clear()  # one workload's inputs alive at a time
        _INPUTS[key] = make_inputs(workload, DEVICE)
    return _INPUTS[key]


def _reference_value(op, ref_name, workload, inputs):
    key = (op, ref_name, workload.name, QUICK)
    if key not in _REF_VALUES:
        ref = next(p for p in P.providers_for(op, DEVICE) if p.name == ref_name)
        prep = ref.prepare(workload, inputs, CTX)
        _REF_VALUES[key] = prep.value(prep.fn())
    return _REF_VALUES[key]


def _synced(fn):
    if DEVICE.type != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize(DEVICE)
        return out
    return call


@pytest.fixture
def run_provider(benchmark):
    """``run_provider(op, provider_name, workload_name)``: benchmark one provider on one
    workload, skipping (with the reason) where the harness would report n/a."""

    def run(op: str, name: str, workload_name: str):
        workload = (QUICK_WORKLOADS if QUICK else WORKLOADS)[workload_name]
        prov = next(p for p in P.providers_for(op, DEVICE) if p.name == name)
        if prov.unavailable:
            pytest.skip(f"{name}: {prov.unavailable}")
        if prov.untimed:
            pytest.skip(f"{name}: {prov.untimed}")
        inputs = _inputs(workload)
        if prov.dense_bytes is not None and workload.kind == "ot":
            log_domain = _ref.choose_method(inputs.cost, workload.eps, inputs.cost.dtype) == "log"
            need = prov.dense_bytes(op, CTX, workload, log_domain)
            if need > MEM_CAP:
                pytest.skip(f"{name}: would keep ~{need / 2 ** 30:.1f} GiB of temporaries alive")
        too_slow = _PROBE.too_slow(op, workload, prov, inputs)
        if too_slow:
            pytest.skip(f"{name}: {too_slow}")
        try:
            prep = prov.prepare(workload, inputs, CTX)
        except P.NotApplicable as exc:
            pytest.skip(f"{name}: {exc}")
        fn = _synced(prep.fn)
        t0 = time.perf_counter()
        try:
            out = fn()  # compilation and lazy initialisation stay out of the statistics
        except Exception as exc:
            if prov.compiles:
                pytest.skip(f"{name}: torch.compile failed: {type(exc).__name__}: {exc}")
            raise
        first = time.perf_counter() - t0
        value = prep.value(out)
        benchmark.extra_info.update(
            provider=name, family=prov.family, op=op, workload=workload_name, B=workload.B,
            m=workload.m, n=workload.n, eps=workload.eps, n_iters=workload.n_iters,
            device=str(DEVICE), first_call_s=first, value=value, quick=QUICK)
        if prov.reference:
            ref = _reference_value(op, prov.reference, workload, inputs)
            benchmark.extra_info["ref_value"] = ref
            assert abs(value - ref) <= AGREEMENT_RTOL * max(1.0, abs(ref)), \
                f"{name} computes {value} where {prov.reference} gives {ref}"
        if prov.tags.get("per_teacher"):
            benchmark.extra_info["n_teachers"] = workload.n_teachers  # times cover all of them
        if QUICK:
            benchmark.pedantic(fn, rounds=1, warmup_rounds=0, iterations=1)
            return
        t0 = time.perf_counter()
        fn()  # a warm call sizes the number of rounds to the budget
        warm = time.perf_counter() - t0
        rounds = max(1, min(ROUNDS, int(BUDGET_S / max(warm, 1e-9))))
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=0, iterations=1)

    return run
