"""The one place that decides which implementation runs (SPEC §8, issue "dispatch").

A backend is an object with

* ``name``: "torch", "cpp", "triton" or "cuda";
* ``supports(device) -> bool``: whether it can run on tensors of that device here and now;
* ``solve(a, b, cost, *, eps, n_iters, tol, check_every, method) -> SolveOutput``;
* ``kd_forward(student_logits, teacher_logits, cost, *, tau, eps, n_iters, tol, check_every,
  teacher_grad, method) -> KDForward``;
* optionally ``marginal_flags(a, b, tol) -> (neg_a, neg_b, unbalanced) | None``: the input check of
  ``sk.sinkhorn`` in one compiled pass (None where it does not apply; the torch check runs then)

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


class BackendRegistry:
    """Lazy loading, "auto" resolution and fallback warnings for one op's backends.

    ``modules`` maps each compiled backend's name to the module that defines its ``BACKEND``;
    ``auto_order`` lists names fastest first per device type; ``torch_backend`` is the reference,
    always available. ``label`` names the op in messages (empty for Sinkhorn, the package's main
    op). ``env_var``, when given, is read by "auto" to force a backend. A backend may declare
    ``max_rows`` (a kernel that holds the whole batch in one program): "auto" then passes over it
    for larger batches, and naming it explicitly for one raises ValueError.
    """

    def __init__(self, modules, auto_order, torch_backend, *, label="", kind="Sinkhorn",
                 env_var=None):
        self.modules = dict(modules)
        self.auto_order = dict(auto_order)
        self.label = label
        self.kind = kind
        self.env_var = env_var
        self._loaded = {"torch": torch_backend}
        self._failed: dict[str, str] = {}
        self._warned: set = set()

    def load(self, name: str):
        if name in self._loaded:
            return self._loaded[name]
        if name in self._failed:
            return None
        if name not in self.modules:
            self._failed[name] = f"no {self.kind} kernel is written for backend {name!r}"
            return None
        try:
            self._loaded[name] = importlib.import_module(self.modules[name]).BACKEND
        except Exception as exc:  # an unbuilt extension or a missing Triton only disables that backend
            self._failed[name] = f"{type(exc).__name__}: {exc}"
            return None
        return self._loaded[name]

    def unavailable_reason(self, name: str) -> str | None:
        """Why a backend cannot be loaded here (None when it loads)."""
        self.load(name)
        return self._failed.get(name)

    def available(self, device: str | torch.device | None = None) -> list[str]:
        """Backends that load here, optionally only those that run on ``device``."""
        out = []
        for name in BACKEND_NAMES:
            be = self.load(name)
            if be is not None and (device is None or be.supports(torch.device(device))):
                out.append(name)
        return out

    @staticmethod
    def _fits(be, rows) -> bool:
        limit = getattr(be, "max_rows", None)
        return rows is None or limit is None or rows <= limit

    def resolve(self, name: str, device: torch.device, rows: int | None = None):
        """The backend for ``name`` ("auto" or explicit) on ``device``, for a batch of ``rows``."""
        if name == "auto":
            forced = os.environ.get(self.env_var, "").strip().lower() if self.env_var else ""
            if forced and forced != "auto":
                if forced not in BACKEND_NAMES:
                    raise ValueError(f"environment variable {self.env_var} must be one of "
                                     f"{list(BACKEND_NAMES)} or 'auto', got {forced!r}")
                return self.resolve(forced, device, rows)
            for cand in self.auto_order.get(device.type, ("torch",)):
                be = self.load(cand)
                if be is not None and be.supports(device):
                    if self._fits(be, rows):
                        return be
                    continue  # too many rows for this kernel: a size limit, not a missing backend
                if cand != "torch" and (device.type, cand) not in self._warned:
                    self._warned.add((device.type, cand))
                    why = self._failed.get(cand, f"it does not run on {device.type} tensors here")
                    prefix = "selkd_kernels" + (f".{self.label}" if self.label else "")
                    warnings.warn(f"{prefix}: backend '{cand}' unavailable ({why}); "
                                  f"falling back to the next choice", RuntimeWarning, stacklevel=4)
            return self._loaded["torch"]
        if name not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {['auto', *BACKEND_NAMES]}, got {name!r}")
        be = self.load(name)
        if be is None:
            where = f" for {self.label}" if self.label else ""
            raise ValueError(f"backend {name!r} is not available{where} here: "
                             f"{self._failed.get(name)}")
        if not be.supports(device):
            raise ValueError(f"backend {name!r} cannot run on {device.type} tensors here")
        if not self._fits(be, rows):
            raise ValueError(f"scores has {rows} rows but backend {name!r} handles at most "
                             f"{be.max_rows} per batch; use backend='cpp' or 'torch'")
        return be


SINKHORN = BackendRegistry(_MODULES, AUTO_ORDER, TorchBackend(), env_var=ENV_VAR)


def unavailable_reason(name: str) -> str | None:
    """Why a Sinkhorn backend cannot be loaded here (None when it loads)."""
    return SINKHORN.unavailable_reason(name)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Sinkhorn backends that load here, optionally only those that run on ``device``."""
    return SINKHORN.available(device)


def get_backend(name: str, device: torch.device):
    """Resolve ``name`` ("auto" or an explicit backend) for tensors on ``device``."""
    return SINKHORN.resolve(name, device)


def _preload() -> None:
    """Import, when the package is imported, the compiled backends that "auto" can pick on this
    machine. Importing a module inside a ``torch.compile``'d function is a graph break, so by the
    time a traced training step resolves its backend this must be a dictionary lookup."""
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for kind in kinds:
        for name in AUTO_ORDER[kind]:
            if name != "torch":
                SINKHORN.load(name)


_preload()
