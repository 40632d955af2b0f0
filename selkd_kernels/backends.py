"""The one place that decides which implementation runs (SPEC §8, issue "dispatch").

A backend is an object with

* ``name``: "torch", "cpp", "triton" or "cuda";
* ``supports(device) -> bool``: whether it can run on tensors of that device here and now;
* ``solve(a, b, cost, *, eps, n_iters, tol, check_every, method) -> SolveOutput``;
* ``kd_forward(student_logits, teacher_logits, cost, *, tau, eps, n_iters, tol, check_every,
  teacher_grad, method) -> KDForward``

with the semantics of :mod:`selkd_kernels.sinkhorn_reference` (same iteration order, same stopping
schedule, same outputs). Inputs arrive validated; ``student_logits`` already carries the compute
dtype for the reference, compiled backends may accept half inputs directly. ``method`` is a hint:
the reference and the cpp backend honour it (it selects the standard-domain or the log-domain /
stabilised iteration), other backends may ignore it.

Compiled backends live in their own modules and are imported lazily; a module that fails to
import (extension not built, Triton missing) makes that backend unavailable, nothing more.
``backend="auto"`` takes the first available entry of :data:`AUTO_ORDER` for the device; the
environment variable ``SELKD_BACKEND`` overrides ``"auto"``. The backends "auto" can pick on this
machine are imported with the package (see :func:`_preload`), so that resolving a backend inside a
``torch.compile``'d function is a dictionary lookup and not an import (a graph break).
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import sinkhorn_reference as _ref

ENV_VAR = "SELKD_BACKEND"
BACKEND_NAMES = ("torch", "cpp", "triton", "cuda")

# module that defines ``BACKEND`` for each compiled backend
_MODULES = {
    "cpp": "selkd_kernels.sinkhorn_cpp",
    "triton": "selkd_kernels.sinkhorn_triton",
    "cuda": "selkd_kernels.sinkhorn_cuda",
}

# fastest first, per device type
AUTO_ORDER = {
    "cpu": ("cpp", "torch"),
    "cuda": ("triton", "cuda", "torch"),
}


class TorchBackend:
    name = "torch"

    def supports(self, device: torch.device) -> bool:
        return True

    def solve(self, a, b, cost, *, eps, n_iters, tol, check_every, method="auto"):
        cd = _ref_dtype(a, b, cost)
        return _ref.solve(a.to(cd), b.to(cd), cost.to(cd), eps=eps, n_iters=n_iters, tol=tol,
                          check_every=check_every, method=method)

    def kd_forward(self, student_logits, teacher_logits, cost, *, tau, eps, n_iters, tol,
                   check_every, teacher_grad, method="auto"):
        cd = _ref_dtype(student_logits, teacher_logits, cost)
        return _ref.kd_forward(student_logits.to(cd), teacher_logits.to(cd), cost.to(cd), tau=tau,
                               eps=eps, n_iters=n_iters, tol=tol, check_every=check_every,
                               teacher_grad=teacher_grad, method=method)


def _ref_dtype(*ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


_LOADED = {"torch": TorchBackend()}
_FAILED: dict[str, str] = {}
_WARNED: set = set()


def _load(name: str):
    if name in _LOADED:
        return _LOADED[name]
    if name in _FAILED:
        return None
    try:
        mod = importlib.import_module(_MODULES[name])
        _LOADED[name] = mod.BACKEND
    except Exception as exc:  # an unbuilt extension or a missing Triton only disables that backend
        _FAILED[name] = f"{type(exc).__name__}: {exc}"
        return None
    return _LOADED[name]


def unavailable_reason(name: str) -> str | None:
    """Why a backend cannot be loaded here (None when it loads)."""
    _load(name)
    return _FAILED.get(name)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that load here, optionally only those that run on ``device``."""
    out = []
    for name in BACKEND_NAMES:
        be = _load(name)
        if be is None:
            continue
        if device is not None and not be.supports(torch.device(device)):
            continue
        out.append(name)
    return out


def get_backend(name: str, device: torch.device):
    """Resolve ``name`` ("auto" or an explicit backend) for tensors on ``device``."""
    if name == "auto":
        forced = os.environ.get(ENV_VAR, "").strip().lower()
        if forced and forced != "auto":
            if forced not in BACKEND_NAMES:
                raise ValueError(f"environment variable {ENV_VAR} must be one of "
                                 f"{list(BACKEND_NAMES)} or 'auto', got {forced!r}")
            return get_backend(forced, device)
        order = AUTO_ORDER.get(device.type, ("torch",))
        for cand in order:
            be = _load(cand)
            if be is not None and be.supports(device):
                return be
            if cand != "torch" and (device.type, cand) not in _WARNED:
                _WARNED.add((device.type, cand))
                why = _FAILED.get(cand, f"it does not run on {device.type} tensors here")
                warnings.warn(f"selkd_kernels: backend '{cand}' unavailable ({why}); "
                              f"falling back to the next choice", RuntimeWarning, stacklevel=3)
        return _LOADED["torch"]
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {['auto', *BACKEND_NAMES]}, got {name!r}")
    be = _load(name)
    if be is None:
        raise ValueError(f"backend {name!r} is not available here: {_FAILED.get(name)}")
    if not be.supports(device):
        raise ValueError(f"backend {name!r} cannot run on {device.type} tensors here")
    return be


def _preload() -> None:
    """Import, when the package is imported, the compiled backends that "auto" can pick on this
    machine. Importing a module inside a ``torch.compile``'d function is a graph break, so by the
    time a traced training step resolves its backend this must be a dictionary lookup."""
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for kind in kinds:
        for name in AUTO_ORDER[kind]:
            if name != "torch":
                _load(name)


_preload()
