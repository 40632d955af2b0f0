"""Where the Triton backends of every op can run: a CUDA device, or CPU tensors through the
Triton interpreter (``TRITON_INTERPRET=1``), the test suite's mode."""
from __future__ import annotations

import os

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
