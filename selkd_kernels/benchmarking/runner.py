"""Runs providers over workloads and sweep points and turns each run into one result row.

Per (op, problem) the inputs are built once and shared by every provider. Per provider:
availability and memory guards, preparation, a first (cold) call that also yields the value
checked against the reference, warm-up, peak memory on the last warm-up call, then timed samples.
A provider that would not fit the time budget gets fewer repeats, and the row says so.
"""
from __future__ import annotations

import gc
import time
import traceback
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from ..ops.sinkhorn import reference as _ref
from . import providers as P
from .timer import Timer, TimingStats, measure_peak_memory
from .workloads import QUICK_SWEEP_VALUES, Workload, make_inputs

# |value - reference| <= RTOL * max(1, |reference|) counts as the same answer
AGREEMENT_RTOL = 1e-3
# problems with at least this many B*m*n*n_iters get a short probe run before being timed
PROBE_ABOVE_ELEMENT_ITERS = 2e9
PROBE_ITERS = 2


@dataclass
class RunConfig:
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    repeats: int = 15
    warmup: int = 2
    budget_s: float = 60.0
    mem_cap_bytes: float = 8 * 2 ** 30
    quick: bool = False
    seed: int = 0
    measure_memory: bool = True
    providers: Optional[list] = None
    min_sample_time: float = 2e-3
    max_call_s: float = 60.0  # skip a provider whose one call would take longer (probe estimate)


@dataclass
class Point:
    """One problem to run: a workload, or one value of a sweep."""
    workload: Workload
    sweep: Optional[str] = None
    sweep_param: Optional[str] = None
    sweep_value: Optional[float] = None
    ops: Optional[tuple] = None  # restrict this point to these ops (None: all that apply)


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def _is_unsupported(exc: BaseException) -> bool:
    """Errors by which a backend declines an op it does not implement (reported as n/a)."""
    if isinstance(exc, NotImplementedError):
        return True
    return isinstance(exc, ValueError) and any(
        s in str(exc) for s in ("is not available", "cannot run on", "not supported"))


class Runner:
    def __init__(self, config: RunConfig, progress=None):
        self.cfg = config
        self.ctx = P.Context(device=config.device, dtype=config.dtype, quick=config.quick,
                             compile_backend="aot_eager" if config.quick else "inductor")
        self.timer = Timer(config.device, min_sample_time=config.min_sample_time)
        self.progress = progress

    # ------------------------------------------------------------------ public
    def tasks(self, ops, points: list[Point]) -> list[tuple[str, Point, list]]:
        out = []
        for pt in points:
            for op in ops:
                if op not in P.OPS_BY_KIND[pt.workload.kind]:
                    continue
                if pt.ops is not None and op not in pt.ops:
                    continue
                provs = P.select(P.providers_for(op, self.cfg.device), self.cfg.providers)
                if provs:
                    out.append((op, pt, provs))
        return out

    def run(self, ops, points: list[Point]) -> list[dict]:
        rows = []
        inputs_cache: dict = {}
        for op, pt, provs in self.tasks(ops, points):
            key = id(pt)
            if key not in inputs_cache:
                inputs_cache.clear()
                inputs_cache[key] = make_inputs(pt.workload, self.cfg.device, self.cfg.dtype,
                                                self.cfg.seed)
            rows.extend(self.run_task(op, pt, provs, inputs_cache[key]))
        return rows

    # ------------------------------------------------------------------ one (op, point)
    def run_task(self, op: str, pt: Point, provs: list, inputs) -> list[dict]:
        rows = []
        for prov in provs:
            if self.progress is not None:
                self.progress.set_postfix_str(f"{op} {pt.workload.name} {prov.name}", refresh=False)
            rows.append(self._run_provider(op, pt, prov, inputs))
            if self.progress is not None:
                self.progress.update(1)
        if not self.cfg.quick:
            # reference cycles (closures, autograd graphs) can pin large temporaries; with Dynamo
            # loaded a collection takes ~0.5 s, so once per problem, never in --quick
            gc.collect()
        refs = {r["provider"]: r["value"] for r in rows if r.get("value") is not None}
        refs.update(self._missing_reference_values(op, pt, provs, inputs, refs))
        for prov, row in zip(provs, rows):
            ref = refs.get(prov.reference) if prov.reference else None
            if row.get("value") is not None and ref is not None:
                diff = abs(row["value"] - ref)
                row["ref_value"] = ref
                row["abs_diff_vs_ref"] = diff
                row["agrees_with_ref"] = bool(diff <= AGREEMENT_RTOL * max(1.0, abs(ref)))
        return rows

    def _missing_reference_values(self, op, pt, provs, inputs, known) -> dict:
        """Values of references the selected providers are checked against but that were not run
        (filtered out by --providers): one untimed call each."""
        wanted = {p.reference for p in provs if p.reference} - set(known)
        values = {}
        for ref in P.providers_for(op, self.cfg.device):
            if ref.name not in wanted or ref.unavailable:
                continue
            try:
                prep = ref.prepare(pt.workload, inputs, self.ctx)
                values[ref.name] = prep.value(prep.fn())
            except Exception:  # a broken reference shows up in its own row when it is selected
                pass
        return values

    # ------------------------------------------------------------------ one provider
    def _base_row(self, op, pt: Point, prov) -> dict:
        w = pt.workload
        return {"op": op, "workload": w.name, "kind": w.kind, "sweep": pt.sweep,
                "sweep_param": pt.sweep_param, "sweep_value": pt.sweep_value,
                "provider": prov.name, "family": prov.family, "B": w.B, "m": w.m, "n": w.n,
                "eps": w.eps, "n_iters": w.n_iters, "tau": w.tau,
                "device": str(self.cfg.device), "dtype": str(self.cfg.dtype).replace("torch.", ""),
                "quick": self.cfg.quick, "status": "ok", "note": "",
                "time_ms_median": None, "time_ms_q1": None, "time_ms_q3": None,
                "time_ms_iqr": None, "time_ms_min": None, "time_ms_mean": None,
                "repeats": 0, "number": 0, "first_call_s": None, "peak_mem_mb": None,
                "mem_method": None, "value": None, "ref_value": None, "abs_diff_vs_ref": None,
                "agrees_with_ref": None}

    def too_slow(self, op, w: Workload, prov, inputs) -> Optional[str]:
        """On big problems, time the provider on PROBE_ITERS iterations of the same problem and
        extrapolate linearly; return why it is skipped when one call would exceed max_call_s."""
        if (self.cfg.quick or w.kind != "ot" or prov.compiles or w.n_iters <= PROBE_ITERS
                or w.B * w.m * w.n * w.n_iters < PROBE_ABOVE_ELEMENT_ITERS):
            return None
        probe_w = replace(w, n_iters=PROBE_ITERS)
        try:
            prep = prov.prepare(probe_w, inputs, self.ctx)
            t0 = time.perf_counter()
            prep.fn()
            self.timer.sync()
            est = (time.perf_counter() - t0) * w.n_iters / PROBE_ITERS
        except Exception:  # the real run reports the failure
            return None
        if est > self.cfg.max_call_s:
            return (f"~{est:.0f}s per call (extrapolated from {PROBE_ITERS} iterations) exceeds "
                    f"--max-call-s {self.cfg.max_call_s:.0f}")
        return None

    def _run_provider(self, op, pt: Point, prov, inputs) -> dict:
        """One result row: guards, preparation, the cold call (value and compile time), then
        the timed samples."""
        row = self._base_row(op, pt, prov)
        skipped = self._skip_reason(op, pt.workload, prov, inputs)
        if skipped is not None:
            row.update(status=skipped[0], note=skipped[1])
            return row
        try:
            prep = prov.prepare(pt.workload, inputs, self.ctx)
        except (P.NotApplicable, ImportError) as exc:
            row.update(status="n/a", note=str(exc) if isinstance(exc, P.NotApplicable)
                       else _short(exc))
            return row
        except Exception as exc:
            row.update(status="error", note=_short(exc))
            return row
        notes = [n for n in (prep.note, prov.untimed) if n]
        first = self._first_call(prov, prep, row)
        if first is None:
            return row
        row["first_call_s"] = first
        per_teacher = pt.workload.n_teachers if prov.tags.get("per_teacher") else 1
        if self.cfg.quick:
            # one cold call: proves the provider runs, claims nothing about speed
            row.update(TimingStats([first / per_teacher], 1).as_dict())
            row["mem_method"] = "not measured (--quick)"
            notes.append("quick: single cold call, not a measurement")
        else:
            self._measure(prov, prep, first, per_teacher, row, notes)
        if row["status"] == "ok":
            row["note"] = "; ".join(notes)
        return row

    def _skip_reason(self, op, w: Workload, prov, inputs) -> Optional[tuple]:
        """(status, note) when the provider is not run on this problem, else None."""
        if prov.unavailable:
            return "unavailable", prov.unavailable
        if prov.untimed and not self.cfg.quick:
            return "n/a", prov.untimed
        if prov.dense_bytes is not None and w.kind == "ot":
            log_domain = _ref.choose_method(inputs.cost, w.eps, inputs.cost.dtype) == "log"
            need = prov.dense_bytes(op, self.ctx, w, log_domain)
            if need > self.cfg.mem_cap_bytes:
                return "skipped", (f"would keep ~{need / 2 ** 30:.1f} GiB of (B,m,n) temporaries "
                                   f"alive (cap {self.cfg.mem_cap_bytes / 2 ** 30:.1f} GiB)")
        too_slow = self.too_slow(op, w, prov, inputs)
        return ("skipped", too_slow) if too_slow else None

    def _first_call(self, prov, prep, row) -> Optional[float]:
        """Seconds of the cold call (compilation, lazy initialisation), its value stored in the
        row; None when it failed, with the row saying why."""
        try:
            t0 = time.perf_counter()
            out = prep.fn()
            self.timer.sync()
            first = time.perf_counter() - t0
            row["value"] = prep.value(out)
            del out
        except Exception as exc:
            if prov.compiles:
                row.update(status="n/a", note=f"torch.compile failed: {_short(exc)}")
            elif _is_unsupported(exc):
                row.update(status="n/a", note=_short(exc))
            else:
                row.update(status="error", note=_short(exc))
                row["traceback"] = traceback.format_exc(limit=6)
            return None
        return first

    def _measure(self, prov, prep, first, per_teacher, row, notes) -> None:
        """Warm-up, peak memory and timed samples into ``row`` (status "error" on failure)."""
        try:
            # a compiling provider's first call is mostly compilation: judge its speed on the next
            probe = self.timer.time_once(prep.fn) if prov.compiles else first
        except Exception as exc:
            row.update(status="error", note=_short(exc))
            return
        if probe > 2 * self.cfg.budget_s:
            row.update(TimingStats([probe / per_teacher], 1).as_dict())
            notes.append(f"one call took {probe:.0f}s (> 2x budget {self.cfg.budget_s:.0f}s): "
                         f"time is that single call, not a measurement")
            return
        try:
            last = self._warm_up(prep, probe, row)
            repeats = self.cfg.repeats
            if last * repeats > self.cfg.budget_s:
                repeats = max(1, min(repeats, int(self.cfg.budget_s / max(last, 1e-9))))
                notes.append(f"repeats cut to {repeats} to fit the {self.cfg.budget_s:.0f}s budget")
            stats = self.timer.measure(prep.fn, repeats=repeats, warmup=0,
                                       number=self.timer.calibrate(last))
        except Exception as exc:
            row.update(status="error", note=_short(exc))
            return
        if per_teacher != 1:
            stats = TimingStats([s / per_teacher for s in stats.samples], stats.number)
        row.update(stats.as_dict())
        if row["peak_mem_mb"] is not None and per_teacher != 1:
            notes.append("peak memory is for the whole repository")

    def _warm_up(self, prep, probe, row) -> float:
        """Untimed calls, peak memory measured on the last; returns the last call's seconds."""
        last = probe
        for i in range(1, self.cfg.warmup):
            if self.cfg.measure_memory and i == self.cfg.warmup - 1:
                t0 = time.perf_counter()
                row["peak_mem_mb"], row["mem_method"] = measure_peak_memory(
                    prep.fn, self.cfg.device)
                last = time.perf_counter() - t0
            else:
                last = self.timer.time_once(prep.fn)
        if self.cfg.measure_memory and self.cfg.warmup <= 1:
            row["peak_mem_mb"], row["mem_method"] = measure_peak_memory(prep.fn, self.cfg.device)
        return last


def points_for_workloads(workloads) -> list[Point]:
    return [Point(w) for w in workloads]


def points_for_sweep(sweep, quick: bool, ops=None) -> list[Point]:
    return [Point(w, sweep.name, sweep.param, v, ops)
            for w, v in zip(sweep.points(quick), _sweep_values(sweep, quick))]


def _sweep_values(sweep, quick):
    return QUICK_SWEEP_VALUES[sweep.name] if quick else sweep.values

