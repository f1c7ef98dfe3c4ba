"""The argument rules every module of the package uses, each written once.

Each check returns the value in its plain Python (or numpy) form and raises a TypeError (wrong
kind of value) or ValueError (right kind, wrong value) whose message names the argument. None
of them imports torch or loads a library (a torch tensor is recognised by its methods), and
numpy is imported only by the array checks: the binding imports this module without numpy.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: numpy is imported by the array checks when they run
    import numpy as np
    import numpy.typing as npt

    from ._types import DeviceSpec, ExpertMapLike

__all__ = [
    "check_timeout",
    "check_count",
    "check_bool",
    "check_row_bytes",
    "check_real",
    "check_index",
    "check_rank_world",
    "check_ranks_per_node",
    "device_index",
    "current_device",
    "to_numpy",
    "expert_map",
    "check_ids",
]


def _is_bool(value: object) -> bool:
    if isinstance(value, bool):
        return True
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.bool_)


def _shown(value: object) -> str:
    """repr for a message, numpy scalars as their Python value (``True``, not ``np.True_``)."""
    np = sys.modules.get("numpy")
    return repr(value.item() if np is not None and isinstance(value, np.generic) else value)


def check_timeout(value: Any, name: str = "timeout", *, env: str | None = None) -> float:
    """Seconds: a real number (not a bool), finite and > 0.

    ``env`` names the environment variable the value was read from (then ``value`` may be its
    raw string); the message names the variable instead of ``name``.
    """
    label = name if env is None else env
    if env is not None and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"{env}={value!r} is not a number of seconds") from None
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise ValueError(f"{label} must be a positive number of seconds, got {_shown(value)}")
    t = float(value)
    if not math.isfinite(t):
        raise ValueError(f"{label} must be a finite number of seconds, got {_shown(value)}")
    if t <= 0:
        raise ValueError(f"{label} must be a positive number of seconds, got {_shown(value)}")
    return t


def _integer(value: Any, name: str) -> int:
    if _is_bool(value):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def check_count(value: Any, name: str, *, minimum: int | None = 1) -> int:
    """An integer (numpy integers too, never a bool) ``>= minimum`` (no bound when None)."""
    v = _integer(value, name)
    if minimum is not None and v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_bool(value: Any, name: str) -> bool:
    """True or False (a numpy bool too); anything else, truthy strings included, is refused."""
    if not _is_bool(value):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_row_bytes(
    value: Iterable[Iterable[int]], name: str = "row_bytes"
) -> tuple[tuple[int, ...], ...]:
    """Per layer, the byte size of one row of each of its tensors: a non-empty list of
    non-empty lists of ints ``>= 1``, as tuples."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"{name} must list, per layer, the bytes of one row of each tensor (a list of "
            f"lists of ints), got {type(value).__name__}"
        )
    layers = []
    for li, layer in enumerate(value):
        if isinstance(layer, (str, bytes)) or not hasattr(layer, "__iter__"):
            raise TypeError(
                f"{name}[{li}] must list the bytes of one row of each tensor of layer {li}, "
                f"got {type(layer).__name__}"
            )
        sizes = tuple(check_count(b, f"{name}[{li}][{ti}]") for ti, b in enumerate(layer))
        if not sizes:
            raise ValueError(f"{name}[{li}] is empty: every layer has at least one tensor")
        layers.append(sizes)
    if not layers:
        raise ValueError(f"{name} is empty: give at least one layer")
    return tuple(layers)


def check_index(value: Any, name: str, size: int) -> int:
    """An integer in ``[0, size)``."""
    v = _integer(value, name)
    if not 0 <= v < size:
        raise ValueError(f"{name} must be in [0, {size}), got {v}")
    return v


def check_real(
    value: Any,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
) -> float:
    """A finite real number (not a bool), ``>= low`` (``> low`` with low_open) and ``<= high``."""
    if _is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low:g}, got {v:g}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high:g}, got {v:g}")
    return v


def check_rank_world(rank: Any, world_size: Any) -> tuple[int, int]:
    """``(rank, world_size)``: integers with ``world_size >= 1`` and ``0 <= rank < world_size``."""
    r = _integer(rank, "rank")
    n = check_count(world_size, "world_size")
    return check_index(r, "rank", n), n


def check_ranks_per_node(value: Any, ep_size: int) -> int | None:
    """``ranks_per_node`` (None: not given): EP ranks per node, from 1 to ``ep_size``."""
    if value is None:
        return None
    rpn = check_count(value, "ranks_per_node")
    if rpn > ep_size:
        raise ValueError(
            f"ranks_per_node counts EP ranks per node, at most ep_size ({ep_size}); got {rpn}"
        )
    return rpn


def current_device() -> int:
    """The current CUDA device: torch's when torch has initialised CUDA, else the driver's
    context device, else 0."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    from ._nccl import cuda

    drv = cuda.driver()
    if drv is not None:
        d = drv.current_device()
        if d is not None:
            return d
    return 0


_DEVICE_KINDS = "an int, 'cuda:N' or a torch.device"


def device_index(device: DeviceSpec) -> int:
    """A CUDA device index from an int, ``"cuda"``, ``"cuda:N"``, ``"N"`` or a torch.device.

    None, a bare ``"cuda"`` and ``torch.device("cuda")`` mean the current device.
    """
    return _device_index(device)


def _device_index(device: Any) -> int:  # any value: it is being checked
    if device is None:
        return current_device()
    if _is_bool(device):
        raise TypeError(f"device must be {_DEVICE_KINDS}, got bool")
    if isinstance(device, str):
        s = device.strip()
        if s.startswith("cuda"):
            s = s[4:].lstrip(":")
            if not s:
                return current_device()
        try:
            idx = int(s)
        except ValueError:
            raise ValueError(f"device {device!r} is not 'cuda:N' or an index") from None
    elif getattr(device, "type", None) is not None and not isinstance(device, numbers.Integral):
        if device.type != "cuda":
            raise ValueError(f"device must be a CUDA device, got {device}")
        if device.index is None:
            return current_device()
        idx = device.index
    else:
        try:
            idx = operator.index(device)
        except TypeError:
            raise TypeError(
                f"device must be {_DEVICE_KINDS}, got {type(device).__name__}"
            ) from None
    if idx < 0:
        raise ValueError(f"device index must be >= 0, got {idx}")
    return idx


def _host_array(x: Any) -> Any:
    """A torch tensor (on any device, bfloat16 included) as numpy; anything else unchanged."""
    if type(x).__module__ == "numpy" or not hasattr(x, "numpy"):
        return x
    if hasattr(x, "detach"):
        x = x.detach()
    if hasattr(x, "cpu"):
        x = x.cpu()
    if str(getattr(x, "dtype", "")) == "torch.bfloat16":
        x = x.float()
    return x.numpy()


def to_numpy(
    x: npt.ArrayLike,
    name: str,
    *,
    dtype: npt.DTypeLike | None = None,
    ndim: int | None = None,
    dims: str | None = None,
) -> np.ndarray:
    """``x`` (a torch tensor on any device, a numpy array or nested lists) as a numpy array.

    ``dtype``: a concrete integer or float dtype (the values must be integers, or numbers, and
    are cast to it); an abstract one (``np.integer``, ``np.number``) only checks the kind and
    keeps the array's own dtype. An empty float array passes as an integer one (``[]`` is
    float64 in numpy). ``ndim``: the number of dimensions required; ``dims`` names them in the
    message (e.g. ``"[num_layers, num_physical]"``).
    """
    import numpy as np

    x = _host_array(x)
    integer = dtype is not None and np.issubdtype(dtype, np.integer)
    what = ("integer array" if integer else "array of numbers") if dtype is not None else "array"
    shape_word = f"{ndim}-D " if ndim is not None else ""
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{name} must be a {shape_word}{what}: {exc}") from None
    kind = arr.dtype.kind
    if integer and kind not in "iu":
        if not (arr.size == 0 and kind == "f"):
            raise TypeError(f"{name} must be an integer array, got {arr.dtype}")
        arr = arr.astype(np.int64)
    elif dtype is not None and not integer and kind not in "iuf":
        raise TypeError(f"{name} must be an integer or float array, got {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        label = f" {dims}" if dims else ""
        raise ValueError(f"{name} must be {ndim}-D{label}, got shape {tuple(arr.shape)}")
    if dtype is not None and _is_concrete(dtype):
        arr = arr.astype(dtype, copy=False)
    return arr


def _is_concrete(dtype: npt.DTypeLike) -> bool:
    import numpy as np

    return not (isinstance(dtype, type) and dtype in (np.integer, np.floating, np.number))


def expert_map(x: ExpertMapLike, name: str) -> np.ndarray:
    """An expert map: int64 ``[num_layers, num_physical]``, contiguous, from numpy, torch or
    lists; unsigned ids past int64 are refused by position."""
    import numpy as np

    arr = to_numpy(x, name, dtype=np.integer, ndim=2, dims="[num_layers, num_physical]")
    if arr.dtype.kind == "u" and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        flat = int(np.argmax(arr.ravel() > np.iinfo(np.int64).max))
        layer, slot = divmod(flat, arr.shape[1])
        raise ValueError(
            f"{name}: layer {layer}, slot {slot} holds expert id {int(arr[layer, slot])}, "
            "which does not fit in int64"
        )
    return np.ascontiguousarray(arr, dtype=np.int64)


def check_ids(arr: np.ndarray, name: str, num_logical: int | None) -> None:
    """Every id of an expert map (from :func:`expert_map`) is -1 (empty) or in
    ``[0, num_logical)``; the first one that is not is named by layer and slot."""
    import numpy as np

    if arr.size == 0:
        return
    flat = arr.ravel()
    if int(flat.min()) < -1:
        i = int(np.argmax(flat < -1))
        layer, slot = divmod(i, arr.shape[1])
        raise ValueError(
            f"{name}: layer {layer}, slot {slot} holds expert id {int(flat[i])}; "
            "ids must be >= -1 (-1 = empty slot)"
        )
    if num_logical is not None and int(flat.max()) >= num_logical:
        i = int(np.argmax(flat >= num_logical))
        layer, slot = divmod(i, arr.shape[1])
        raise ValueError(
            f"{name}: layer {layer}, slot {slot} holds expert id {int(flat[i])}, "
            f"which is >= num_logical ({num_logical})"
        )
