"""Access to the compiled CPU extension ``selkd_kernels._C`` for the partial-OT ops.

``setup.py`` compiles every ``csrc/*.cpp`` into ``selkd_kernels._C``; its ops register themselves
in the ``selkd`` namespace when the shared object is loaded, so ``import selkd_kernels._C`` is all
that is needed. If the object has no Python init function (a build holding only ``TORCH_LIBRARY``
registrations), loading it as a plain library has the same effect, so we fall back to that.
"""
from __future__ import annotations

import glob
import importlib
import os

import torch

_loaded = False


def _load() -> None:
    global _loaded
    if _loaded:
        return
    try:
        importlib.import_module("selkd_kernels._C")
    except ImportError as exc:
        here = os.path.dirname(os.path.abspath(__file__))
        candidates = sorted(glob.glob(os.path.join(here, "_C*.so")) +
                            glob.glob(os.path.join(here, "_C*.pyd")))
        if not candidates:
            raise ImportError(f"selkd_kernels._C is not built: {exc}") from exc
        torch.ops.load_library(candidates[0])
    _loaded = True


def require_ops(*names: str) -> None:
    """Raise ImportError unless every ``torch.ops.selkd.<name>`` is registered."""
    _load()
    missing = [n for n in names if not _has_op(n)]
    if missing:
        raise ImportError(f"selkd_kernels._C lacks the ops {missing}; rebuild the extension "
                          f"(pip install --no-build-isolation -e .)")


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.selkd, name)
        return True
    except (AttributeError, RuntimeError):
        return False
