"""Timing and peak-memory measurement.

* GPU work is asynchronous: on CUDA a sample is bracketed by CUDA events and the device is
  synchronised before reading them; on the CPU a monotonic clock brackets the calls.
* Warm-up calls (first-call compilation, lazy initialisation, allocator growth) are never part of
  a sample.
* A sample times ``number`` back-to-back calls and is divided by ``number``, so sub-millisecond
  ops are not dominated by clock granularity and call overhead of the timer itself.
* Reported: median and interquartile range over the samples (robust to the outliers a shared
  machine produces), plus min/mean for reference.

Peak memory: CUDA reports the allocator's peak directly. On the CPU, tracemalloc cannot see
torch's allocations, so the kernel's resident-set high-water mark is used instead: Linux lets a
process reset it (``/proc/self/clear_refs`` <- "5"), after which ``VmHWM - VmRSS(before)`` is the
extra resident memory the call needed; glibc's free heap pages are released first (``malloc_trim``)
so reused memory counts. Where that is unavailable the value is None ("n/a").
"""
from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch


def percentile(sorted_xs: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of an already sorted sequence."""
    if not sorted_xs:
        return math.nan
    pos = (len(sorted_xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    frac = pos - lo
    return sorted_xs[lo] * (1.0 - frac) + sorted_xs[hi] * frac


@dataclass
class TimingStats:
    """Per-call times in seconds: one entry per sample (each the mean of ``number`` calls)."""
    samples: list = field(default_factory=list)
    number: int = 1

    def _sorted(self):
        return sorted(self.samples)

    @property
    def median(self) -> float:
        return percentile(self._sorted(), 50)

    @property
    def q1(self) -> float:
        return percentile(self._sorted(), 25)

    @property
    def q3(self) -> float:
        return percentile(self._sorted(), 75)

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def min(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else math.nan

    def as_dict(self, unit: float = 1e3) -> dict:
        """Summary in milliseconds (``unit`` scales seconds)."""
        return {"time_ms_median": self.median * unit, "time_ms_q1": self.q1 * unit,
                "time_ms_q3": self.q3 * unit, "time_ms_iqr": self.iqr * unit,
                "time_ms_min": self.min * unit, "time_ms_mean": self.mean * unit,
                "repeats": len(self.samples), "number": self.number}


class Timer:
    """Times a zero-argument callable on ``device``.

    ``clock`` (seconds, monotonic) is injectable so the statistics can be tested on a fake clock;
    it is used on the CPU only, CUDA samples come from events.
    """

    def __init__(self, device="cpu", clock: Callable[[], float] = time.perf_counter,
                 min_sample_time: float = 2e-3, max_number: int = 1000):
        self.device = torch.device(device)
        self.clock = clock
        self.min_sample_time = min_sample_time
        self.max_number = max_number
        self.cuda = self.device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def time_once(self, fn: Callable, number: int = 1) -> float:
        """Seconds per call of ``number`` consecutive calls (device work included)."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            self.sync()
            start.record()
            for _ in range(number):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3 / number
        self.sync()
        t0 = self.clock()
        for _ in range(number):
            fn()
        self.sync()
        return (self.clock() - t0) / number

    def calibrate(self, per_call: float) -> int:
        """Calls per sample so that one sample lasts at least ``min_sample_time``."""
        if per_call <= 0:
            return self.max_number
        for n in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
            if n >= self.max_number or n * per_call >= self.min_sample_time:
                return min(n, self.max_number)
        return self.max_number

    def measure(self, fn: Callable, repeats: int, warmup: int = 1,
                number: Optional[int] = None) -> TimingStats:
        """Warm up, then ``repeats`` samples. ``number=None`` calibrates from the last warm-up."""
        per_call = None
        for _ in range(warmup):
            per_call = self.time_once(fn)
        if number is None:
            number = self.calibrate(per_call) if per_call is not None else 1
        samples = [self.time_once(fn, number) for _ in range(repeats)]
        return TimingStats(samples, number)


# ----------------------------------------------------------------------------- peak memory

def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as fh:
            m = re.search(rf"^{key}:\s+(\d+)\s+kB", fh.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> bool:
    """Return the C heap's free pages to the OS (glibc ``malloc_trim``).

    Without it, a call that reuses memory freed by earlier calls never raises the resident size,
    and its peak would read as ~0: glibc keeps freed tensors' pages in the heap. After the trim,
    every page the call touches is faulted in again and shows up in the high-water mark.
    """
    try:
        import ctypes
        import ctypes.util
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0)) or True
    except (OSError, AttributeError):
        return False


def cpu_peak_method() -> Optional[str]:
    """Name of the CPU peak-memory method usable here, or None."""
    if _proc_status_kb("VmHWM") is None or not _reset_rss_peak():
        return None
    return "rss-high-water-mark (/proc/self/clear_refs reset)"


def measure_peak_memory(fn: Callable, device="cpu") -> tuple[Optional[float], str]:
    """Run ``fn`` once and return (extra peak memory in MiB, method). None when unavailable.

    CUDA: allocator peak above what was allocated before the call. CPU: resident high-water mark
    above the resident size before the call (includes allocator and page-granularity effects;
    memory freed earlier and reused from the process heap is not counted as new).
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return (peak - base) / 2 ** 20, "torch.cuda.max_memory_allocated"
    method = cpu_peak_method()
    if method is None:
        fn()
        return None, "n/a (no resettable resident-set peak on this OS)"
    trimmed = _release_free_heap()
    base = _proc_status_kb("VmRSS")
    _reset_rss_peak()
    fn()
    peak = _proc_status_kb("VmHWM")
    if base is None or peak is None:
        return None, "n/a"
    if trimmed:
        method += " after malloc_trim"
    return max(0, peak - base) / 1024.0, method
