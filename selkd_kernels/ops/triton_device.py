"""Where the Triton backends of every op can run: a CUDA device, or CPU tensors through the
Triton interpreter (``TRITON_INTERPRET=1``), the test suite's mode."""
from __future__ import annotations

import contextlib
import os
import warnings

import torch


def interpreting() -> bool:
    """Whether the Triton interpreter is switched on now."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_supports(device, defined_interpreted: bool) -> bool:
    """Whether kernels defined with the interpreter flag ``defined_interpreted`` run on
    ``device``: ``triton.jit`` reads the flag when a kernel is defined, so CPU tensors work only
    if it was set then and still is."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and interpreting() and defined_interpreted


@contextlib.contextmanager
def quiet(runtime_warnings: bool = False):
    """Silence the interpreter's floating-point noise around kernel launches (nothing on a GPU).

    The interpreter evaluates masked-off lanes with numpy (log 0, inf - inf, 0 / 0, max of an
    all-NaN padding slice); the masks discard those results, so numpy's floating-point errors
    are noise and are ignored (``np.errstate(all="ignore")``). With ``runtime_warnings`` the
    ``RuntimeWarning`` warnings numpy raises through :mod:`warnings` (e.g. an all-NaN slice) are
    ignored too.
    """
    if not interpreting():
        yield
        return
    import numpy as np
    with np.errstate(all="ignore"):
        if not runtime_warnings:
            yield
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            yield
