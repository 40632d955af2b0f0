"""What a result was measured on: machine, library versions, source commit, date.

A timing without this is not comparable with anything, so every run records it.
"""
from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Optional

import torch


def _version(dist: str) -> Optional[str]:
    # Reading the distribution metadata avoids importing heavy packages (Triton) just for this.
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def git_commit() -> dict:
    """Commit of the source tree the package was imported from (None outside a checkout)."""
    root = Path(__file__).resolve().parents[2]
    out = {"commit": None, "dirty": None}
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                       text=True, timeout=10, check=True).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10, check=True).stdout
        out["dirty"] = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def cpp_vector_bits() -> Optional[int]:
    """Vector width of the cpp backend's shared-cost solve here (None without the extension)."""
    try:
        from ..ops.sinkhorn import cpp as sinkhorn_cpp
    except ImportError:
        return None
    return sinkhorn_cpp.vector_bits()


def collect(device="cpu") -> dict:
    device = torch.device(device)
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu_model": cpu_model(),
            "logical_cores": os.cpu_count(),
            "usable_cores": usable_cores(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "triton": _version("triton"),
            "POT": _version("POT") or _version("pot"),
            "numpy": _version("numpy"),
            "selkd_kernels": _version("selkd-kernels"),
        },
        "git": git_commit(),
        "device": str(device),
        "triton_interpret": os.environ.get("TRITON_INTERPRET"),
    }
    info["machine"]["cpp_vector_bits"] = cpp_vector_bits()
    if device.type == "cuda" and torch.cuda.is_available():
        idx = device.index if device.index is not None else torch.cuda.current_device()
        info["machine"]["gpu"] = torch.cuda.get_device_name(idx)
        info["versions"]["cuda"] = torch.version.cuda
    return info
