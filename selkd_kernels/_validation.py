"""Argument checks shared by every public entry point, and the package's compute-dtype rule.

Each check raises ``ValueError`` whose message starts with the argument's name, so a user reading
the traceback knows which argument to fix without reading our code. Numbers may be Python or
NumPy scalars (anything :class:`numbers.Real`, bools excepted); labels may be any integer dtype.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
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


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _symbolic_while_traced() -> bool:
    # torch.compile(dynamic=True) passes Python floats as symbols: math.isfinite cannot trace
    # them, and their values are checked by the eager call (or the module's constructor)
    return torch.compiler.is_compiling()


def check_positive(name: str, value) -> float:
    if _symbolic_while_traced():
        return value
    if not _is_real(value):
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    # comparisons, not math.isfinite: they also trace when torch.compile(dynamic=True) makes the
    # number symbolic (NaN fails them too)
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def representable_range(dtype: torch.dtype) -> tuple[float, float]:
    """``[sqrt(tiny), sqrt(max)]`` of ``dtype`` (float32: about [1.1e-19, 1.8e19]; float64: about
    [1.5e-154, 1.3e154]): a scale such as eps or tau in this range, its reciprocal and its
    product or quotient with any number of magnitude at most ``sqrt(max)`` are finite normal
    numbers, which is what the solvers form (``M / eps``, ``eps log a``, ``z / tau``)."""
    fi = torch.finfo(dtype)
    return math.sqrt(fi.tiny), math.sqrt(fi.max)


def check_representable(name: str, value, dtype: torch.dtype) -> float:
    """A positive number inside :func:`representable_range` of the compute dtype ``dtype``:
    outside it (eps = 1e-45 or 1e300, say) finite inputs would give NaN or infinite losses."""
    value = check_positive(name, value)
    lo, hi = representable_range(dtype)
    if not lo <= value <= hi:
        dt = str(dtype).replace("torch.", "")
        raise ValueError(f"{name} must lie in [{lo:.3g}, {hi:.3g}] for {dt} computation (what "
                         f"{name}, 1/{name} and the scaled costs or logits can represent), got "
                         f"{value!r}")
    return value


def check_nonnegative(name: str, value) -> float:
    if _symbolic_while_traced():
        return value
    if not _is_real(value) or not 0 <= float(value) < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def check_optional_positive(name: str, value):
    return None if value is None else check_positive(name, value)


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    devices = [t.device for _, t in items]
    # the message names a tensor off the device most of them share (the first one's on a tie)
    dev = max(devices, key=lambda d: (devices.count(d), -devices.index(d)))
    ref_name = next(n for n, t in items if t.device == dev)
    for n, t in items:
        if t.device != dev:
            raise ValueError(f"{n} is on {t.device} but {ref_name} is on {dev}; "
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


def check_fraction(name: str, value) -> float:
    """A number strictly between 0 and 1."""
    if not _is_real(value) or not 0 < float(value) < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def check_labels(name: str, labels, *, n: int | None = None, num_classes: int | None = None,
                 device: torch.device | None = None, rows_of: str = "the batch") -> torch.Tensor:
    """A 1-D tensor of integer class indices (any integer dtype), as int64.

    ``n``: required length (``rows_of`` names what it must match, for the message);
    ``num_classes``: indices must lie in ``[0, num_classes)`` (checked on the values, one device
    synchronisation; skipped while ``torch.compile`` traces, where the value is not known);
    ``device``: the tensor must live there.
    """
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        raise ValueError(f"{name} must be a 1-D tensor of class indices, got "
                         f"{getattr(labels, 'shape', type(labels).__name__)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {labels.dtype}")
    if n is not None and labels.shape[0] != n:
        raise ValueError(f"{name} has {labels.shape[0]} entries but {rows_of} has {n} rows")
    if device is not None and labels.device != device:
        raise ValueError(f"{name} is on {labels.device} but the other inputs are on {device}")
    labels = labels.long()
    if num_classes is not None and labels.numel() and not torch.compiler.is_compiling():
        lo, hi = (int(v) for v in torch.stack([labels.min(), labels.max()]).tolist())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values in "
                             f"[{lo}, {hi}]")
    return labels


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half inputs accumulate in float32."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) \
        else torch.float32


def check_array(name: str, x, ndim: int) -> np.ndarray:
    """A finite, non-empty, real ``ndim``-dimensional array (torch tensor, numpy array or nested
    sequence), as float64 numpy."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise ValueError(f"{name} must be real, got {x.dtype}")
        x = x.detach().cpu().numpy()
    if np.iscomplexobj(x):
        raise ValueError(f"{name} must be real, got a complex array")
    try:
        x = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a numeric array, got {type(x).__name__}") from e
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def check_label_array(name: str, y, n: int, num_classes: int | None = None) -> np.ndarray:
    """(n,) integer class indices in ``[0, num_classes)`` (torch or numpy, any integer dtype),
    as int64 numpy."""
    if isinstance(y, torch.Tensor):
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ValueError(f"{name} must hold integer class indices, got {y.dtype}")
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{name} must be a 1-D array of integer class indices")
    if y.shape[0] != n:
        raise ValueError(f"{name} has {y.shape[0]} entries, expected {n}")
    if n and y.min() < 0:
        raise ValueError(f"{name} must be non-negative class indices")
    if num_classes is not None and n and y.max() >= num_classes:
        raise ValueError(f"{name} has class {int(y.max())} >= num_classes {num_classes}")
    return y.astype(np.int64)


def check_probability_rows(name: str, p: np.ndarray) -> np.ndarray:
    """Rows of non-negative entries that sum to 1 (softmax outputs, not logits)."""
    if (p < 0).any():
        raise ValueError(f"{name} must be non-negative probabilities")
    if not np.allclose(p.sum(1), 1.0, atol=1e-4):
        raise ValueError(f"{name} rows must sum to 1 (pass softmax outputs, not logits)")
    return p
