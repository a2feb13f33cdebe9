"""Argument rules shared by every op, each defined once: every error names the argument at fault.

The per-op validators (``_validate.py``) and the public functions are built from these. All of them
run before any tensor is touched, so a rejected call leaves every tensor as it was.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Callable, Sequence

import torch

SEED_LIMIT = 1 << 64
STREAM_LIMIT = 1 << 32
#: Element offsets (the index of a tensor's element 0 in the stream, ``offsets=``): ``offset + numel``
#: stays below 2^62, so every index and Philox block number fits an int64 on every backend.
OFFSET_LIMIT = 1 << 62
#: dtypes the seeded kernels read and write (and the projected-Adam parameters).
PERTURB_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: dtypes whose shape alone matters (``seeded_colsum`` reads no data).
ANY_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: dtypes of Adam's moments in ``projected_adam_step_``.
MOMENT_DTYPES = (torch.float32, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(dtype_name(d) for d in dtypes)


def as_int(value: object, name: str) -> int:
    """An integral value (a Python or numpy integer, a 0-d integer tensor); bool is refused."""
    if isinstance(value, bool) or isinstance(value, torch.Tensor) and value.is_floating_point():
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}") from None


def int_at_least(value: object, name: str, low: int) -> int:
    value = as_int(value, name)
    if value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    return value


def seed_value(seed: object, name: str = "seed") -> int:
    """A seed (or any 64-bit counter): an integral value in ``[0, 2^64)``, as a Python int."""
    seed = as_int(seed, name)
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name}: must lie in [0, 2**64), got {seed}")
    return seed


def seed_to_int64(seed: object, name: str = "seed") -> int:
    """Check ``0 <= seed < 2^64`` and return its two's-complement int64 (the ops' encoding)."""
    seed = seed_value(seed, name)
    return seed - SEED_LIMIT if seed >= (1 << 63) else seed


def seed_from_int64(seed: int) -> int:
    """Inverse of :func:`seed_to_int64`: the 64 seed bits as an unsigned int."""
    return seed & (SEED_LIMIT - 1)


def stream_list(streams: Sequence[int] | None, first_stream: int, count: int) -> list[int]:
    """The streams of ``count`` tensors: ``streams`` as given, or ``first_stream, first_stream + 1, ...``."""
    if streams is None:
        first = as_int(first_stream, "first_stream")
        if first < 0 or first + max(count, 1) - 1 >= STREAM_LIMIT:
            raise ValueError(f"first_stream: streams {first}..{first + max(count, 1) - 1} must lie in [0, 2**32)")
        return list(range(first, first + count))
    if type(streams) is list and all(type(s) is int for s in streams):
        return streams
    if isinstance(streams, (str, torch.Tensor)) or not isinstance(streams, Sequence):
        raise TypeError(f"streams: expected a list of ints, got {type(streams).__name__}")
    return [as_int(s, f"streams[{k}]") for k, s in enumerate(streams)]


def check_streams(streams: Sequence[int], count: int, name: str = "streams") -> None:
    if len(streams) != count:
        raise ValueError(f"{name}: expected {count} values (one per tensor), got {len(streams)}")
    for k, s in enumerate(streams):
        if not 0 <= s < STREAM_LIMIT:
            raise ValueError(f"{name}[{k}]: must lie in [0, 2**32), got {s}")


def check_offsets(offsets: Sequence[int], tensors: Sequence[torch.Tensor], name: str = "offsets") -> None:
    """One element offset per tensor: ``offsets[k] >= 0`` and ``offsets[k] + numel <= 2^62``."""
    if len(offsets) != len(tensors):
        raise ValueError(f"{name}: expected {len(tensors)} values (one per tensor), got {len(offsets)}")
    for k, (o, t) in enumerate(zip(offsets, tensors)):
        if not 0 <= o or o + t.numel() > OFFSET_LIMIT:
            raise ValueError(f"{name}[{k}]: must lie in [0, 2**62 - numel], got {o}")


def offset_list(offsets: object, count: int, name: str = "offsets") -> list[int] | None:
    """The ``offsets=`` argument of the public functions: None, or ``count`` ints (range checked by the op)."""
    if offsets is None:
        return None
    if type(offsets) is list and all(type(o) is int for o in offsets):
        out = offsets
    elif isinstance(offsets, (str, torch.Tensor)) or not isinstance(offsets, Sequence):
        raise TypeError(f"{name}: expected a list of ints (one per tensor), got {type(offsets).__name__}")
    else:
        out = [as_int(o, f"{name}[{k}]") for k, o in enumerate(offsets)]
    if len(out) != count:
        raise ValueError(f"{name}: expected {count} values (one per tensor), got {len(out)}")
    return out


def check_stream(stream: int, name: str = "stream") -> None:
    """One stream: in ``[0, 2^32)``."""
    if not 0 <= stream < STREAM_LIMIT:
        raise ValueError(f"{name}: must lie in [0, 2**32), got {stream}")


def check_tensor_list(
    tensors: Sequence[torch.Tensor],
    name: str,
    dtypes: tuple[torch.dtype, ...] = PERTURB_DTYPES,
    *,
    contiguous: bool = True,
) -> torch.device | None:
    """Tensors of the accepted dtypes, all on one device (and contiguous); returns that device."""
    device = None
    for k, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{k}]: expected a tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name}[{k}]: dtype {dtype_name(t.dtype)} is not supported ({dtype_names(dtypes)})")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{name}[{k}]: on {t.device}, but {name}[0] is on {device}; all must share one device")
        if contiguous and not t.is_contiguous():
            raise ValueError(f"{name}[{k}]: must be contiguous (the noise follows the flat row-major index)")
    return device


def check_disjoint(tensors: Sequence[torch.Tensor], label: Callable[[int], str]) -> None:
    """No two of ``tensors`` share a byte of memory; ``label(i)`` names tensor ``i`` in the error.

    The fast kernels update every tensor of a call at once, so overlapping tensors would race (and
    the reference, which runs them one after another, would give another answer): refused
    everywhere. Empty tensors own no memory.
    """
    spans = []
    for i, t in enumerate(tensors):
        size = t.nbytes
        if size:
            start = t.data_ptr()
            spans.append((start, start + size, i))
    if len(spans) < 2:
        return
    spans.sort()
    for (_, end, a), (begin, _, b) in zip(spans, spans[1:]):
        if begin < end:
            a, b = sorted((a, b))
            raise ValueError(
                f"{label(a)}, {label(b)}: share memory; the update needs distinct, non-overlapping tensors"
            )


def check_disjoint_from(
    written: Sequence[torch.Tensor],
    read: Sequence[torch.Tensor],
    label_written: Callable[[int], str],
    label_read: Callable[[int], str],
) -> None:
    """No tensor of ``read`` shares a byte with any of ``written`` (already pairwise disjoint):
    a kernel that writes ``written`` while it reads ``read`` must not read what it has written."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes, i) for i, t in enumerate(written) if t.nbytes)
    if not spans:
        return
    starts = [s[0] for s in spans]
    for j, t in enumerate(read):
        if not t.nbytes:
            continue
        begin = t.data_ptr()
        # disjoint spans sorted by start have sorted ends: only the last one starting before t's end can reach t
        i = bisect.bisect_left(starts, begin + t.nbytes) - 1
        if i >= 0 and spans[i][1] > begin:
            raise ValueError(
                f"{label_written(spans[i][2])}, {label_read(j)}: share memory; a written tensor must not "
                "overlap another written tensor or any tensor that is read"
            )


def per_tensor(value: float | Sequence[float], count: int, name: str) -> list[float]:
    """A float, or one float per tensor, as a list of ``count`` floats."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [float(value)] * count
    if type(value) is list and len(value) == count and all(type(v) is float for v in value):
        return value
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = [float(v) for v in value]
        if len(values) != count:
            raise ValueError(f"{name}: expected a float or {count} values (one per tensor), got {len(values)}")
        return values
    raise TypeError(f"{name}: expected a float or a list of floats, got {type(value).__name__}")


def check_finite_list(values: Sequence[float], count: int, name: str) -> None:
    if len(values) != count:
        raise ValueError(f"{name}: expected {count} values (one per tensor), got {len(values)}")
    for k, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"{name}[{k}]: must be finite, got {v}")


def finite_float(x: object, name: str, *, low: float | None = None, high: float | None = None) -> float:
    """A finite float in [low, high)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name}: must be finite, got {x}")
    if (low is not None and x < low) or (high is not None and x >= high):
        lo = "-inf" if low is None else low
        raise ValueError(f"{name}: must lie in [{lo}, {'inf' if high is None else high}), got {x}")
    return x


def check_choice(value: object, name: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value  # type: ignore[return-value]


def check_no_grad(tensors: Sequence[torch.Tensor], name: str) -> None:
    """In-place updates of tensors that autograd tracks must run under ``torch.no_grad()``."""
    if torch.is_grad_enabled():
        for k, t in enumerate(tensors):
            if t.requires_grad:
                raise RuntimeError(f"{name}[{k}]: requires grad and is updated in place; call under torch.no_grad()")
