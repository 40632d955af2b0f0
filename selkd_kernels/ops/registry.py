"""Backend dispatch shared by every op: the one place that decides which implementation runs.

Every op (``ops/<op>/``) owns one :class:`BackendRegistry`, built in its ``dispatch`` module from

* a reference backend object (``name = "torch"``), always available;
* the module path of each compiled backend; the module defines ``BACKEND``, an object with the
  same methods as the reference backend (the op's protocol, written in its ``dispatch`` module);
* the order in which ``backend="auto"`` tries them, per device type.

A backend object has ``name``, ``supports(device) -> bool`` (whether it runs on tensors of that
device here and now), optionally ``expected_speedup(problem) -> float | None`` (its estimated
speed over the reference backend on the same device for the call described by ``problem``, an
op-defined description built from shapes and arguments only; None: no estimate), and the op's
methods, all taking keyword arguments after the tensors. Inputs arrive
validated; a backend returns results in the compute dtype (:func:`selkd_kernels._validation.
compute_dtype`). A compiled backend whose module fails to import (extension not built, Triton
missing) is unavailable, nothing more: ``"auto"`` falls back to the next entry with one warning
per device type, an explicit name raises ``ValueError`` saying why. When the caller describes
the call (``problem``), ``"auto"`` also passes over a backend that expects to be slower than the
reference there (``expected_speedup < 1``), so that choosing it never makes a call slower than
the reference would be; :meth:`BackendRegistry.explain` says what ``"auto"`` picks and why.

The environment variable ``SELKD_BACKEND`` forces the choice ``"auto"`` makes, for every op.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

ENV_VAR = "SELKD_BACKEND"
BACKEND_NAMES = ("torch", "cpp", "triton")


def check_backend_name(name) -> str:
    """``name`` if it is ``"auto"`` or a known backend, else ValueError naming ``backend``."""
    if not isinstance(name, str) or name not in ("auto", *BACKEND_NAMES):
        raise ValueError(f"backend must be one of {['auto', *BACKEND_NAMES]}, got {name!r}")
    return name


class BackendRegistry:
    """Lazy loading, ``"auto"`` resolution and fallback warnings for one op's backends.

    Args:
        op: the op's name, used in messages ("sinkhorn", "partial_ot").
        modules: compiled backend name -> module that defines ``BACKEND``.
        auto_order: device type -> backend names, fastest first, for ``"auto"``.
        reference: the torch reference backend object.
    """

    def __init__(self, op: str, modules: dict, auto_order: dict, reference):
        self.op = op
        self.modules = dict(modules)
        self.auto_order = dict(auto_order)
        self._loaded = {"torch": reference}
        self._failed: dict[str, str] = {}
        self._warned: set = set()

    def load(self, name: str):
        """The backend object for ``name``, or None when it cannot be loaded here."""
        if name in self._loaded:
            return self._loaded[name]
        if name in self._failed:
            return None
        if name not in self.modules:
            self._failed[name] = f"no {self.op} kernel is written for backend {name!r}"
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
        """Backends that can run here: on ``device`` if given, else on any device of this
        machine (CPU, plus CUDA when a GPU is visible)."""
        devices = [torch.device(device)] if device is not None else _local_devices()
        out = []
        for name in BACKEND_NAMES:
            be = self.load(name)
            if be is not None and any(be.supports(d) for d in devices):
                out.append(name)
        return out

    def preload(self) -> None:
        """Import the compiled backends ``"auto"`` can pick on this machine. Importing inside a
        ``torch.compile``'d function is a graph break, so by the time a traced step resolves its
        backend this must be a dictionary lookup."""
        for dev in _local_devices():
            for name in self.auto_order.get(dev.type, ()):
                self.load(name)

    def resolve(self, name: str, device: torch.device, problem=None):
        """The backend for ``name`` ("auto" or explicit) on ``device``; ``problem`` (optional)
        describes the call for the backends' ``expected_speedup``."""
        check_backend_name(name)
        if name == "auto":
            forced = os.environ.get(ENV_VAR, "").strip().lower()
            if forced and forced != "auto":
                if forced not in BACKEND_NAMES:
                    raise ValueError(f"environment variable {ENV_VAR} must be one of "
                                     f"{list(BACKEND_NAMES)} or 'auto', got {forced!r}")
                return self.resolve(forced, device)
            return self._auto(device, problem)
        be = self.load(name)
        if be is None:
            raise ValueError(f"backend {name!r} is not available for {self.op} here: "
                             f"{self._failed.get(name)}")
        if not be.supports(device):
            raise ValueError(f"backend {name!r} cannot run {self.op} on {device.type} tensors "
                             f"here")
        return be

    @staticmethod
    def _speedup(be, problem):
        hook = getattr(be, "expected_speedup", None)
        if problem is None or hook is None:
            return None
        return hook(problem)

    def _candidates(self, device, problem):
        """``(name, backend or None if it cannot run here, expected speed-up, slower)`` along
        the ``"auto"`` order, lazily: ``"auto"`` stops at its pick, :meth:`explain` goes on."""
        for cand in self.auto_order.get(device.type, ("torch",)):
            be = self.load(cand)
            if be is None or not be.supports(device):
                yield cand, None, None, False
                continue
            speed = self._speedup(be, problem)
            yield cand, be, speed, speed is not None and speed < 1.0 and cand != "torch"

    def explain(self, device, problem=None) -> list[tuple[str, str]]:
        """``(backend, verdict)`` for every entry of the ``"auto"`` order on ``device``, in
        order, the first verdict ``"picked"``: why ``"auto"`` chooses what it chooses."""
        device = torch.device(device)
        out, picked = [], False
        for cand, be, speed, slower in self._candidates(device, problem):
            if be is None:
                why = self._failed.get(cand, f"does not run on {device.type} tensors here")
                out.append((cand, f"unavailable: {why}"))
            elif slower:
                out.append((cand, f"skipped: expected {speed:.2f}x the reference's speed"))
            else:
                note = "" if speed is None else f" (expected {speed:.2f}x the reference's speed)"
                out.append((cand, ("picked" if not picked else "not needed") + note))
                picked = True
        if not picked:
            out.append(("torch", "picked (fallback)"))
        return out

    def _auto(self, device: torch.device, problem=None):
        for cand, be, _, slower in self._candidates(device, problem):
            if be is not None:
                if slower:
                    continue  # expected slower than the reference for this call: no warning
                return be
            if cand != "torch" and (device.type, cand) not in self._warned:
                self._warned.add((device.type, cand))
                why = self._failed.get(cand, f"it does not run on {device.type} tensors here")
                warnings.warn(f"selkd_kernels.{self.op}: backend '{cand}' unavailable ({why}); "
                              f"falling back to the next choice", RuntimeWarning, stacklevel=5)
        return self._loaded["torch"]


def _local_devices() -> list[torch.device]:
    devs = [torch.device("cpu")]
    if torch.cuda.is_available():
        devs.append(torch.device("cuda"))
    return devs
