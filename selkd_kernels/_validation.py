"""Argument checks shared by every public entry point (SPEC §8).

Each check raises ``ValueError`` whose message starts with the argument's name, so a user reading
the traceback knows which argument to fix without reading our code.
"""
from __future__ import annotations

import math
import numbers

import torch

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, x, ndims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in ndims:
        want = " or ".join(str(d) for d in ndims)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), "
                         f"got {x.dtype}")
    if any(s == 0 for s in x.shape):
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def check_nonnegative(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or \
            not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_optional_positive(name: str, value):
    return None if value is None else check_positive(name, value)


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    dev = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev:
            raise ValueError(f"{n} is on {t.device} but {items[0][0]} is on {dev}; "
                             f"all tensors must be on the same device")
    return dev


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices, key=str)}, got {value!r}")
    return value


def check_ot_shapes(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor,
                    a_name: str = "a", b_name: str = "b", cost_name: str = "cost") -> None:
    """a (B, m), b (B, n), cost (m, n) shared or (B, m, n) per row."""
    check_tensor(a_name, a, (2,))
    check_tensor(b_name, b, (2,))
    check_tensor(cost_name, cost, (2, 3))
    check_same_device(**{a_name: a, b_name: b, cost_name: cost})
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{b_name} has batch size {b.shape[0]} but {a_name} has {a.shape[0]}")
    B, m, n = a.shape[0], a.shape[1], b.shape[1]
    want = (m, n) if cost.dim() == 2 else (B, m, n)
    if tuple(cost.shape) != want:
        raise ValueError(f"{cost_name} must have shape {want} to match {a_name} {tuple(a.shape)} and "
                         f"{b_name} {tuple(b.shape)}, got {tuple(cost.shape)}")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half inputs accumulate in float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32
