"""Argument validation shared by the public API: every error names the argument at fault.

All checks run before any kernel is launched, so a rejected call leaves every tensor untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

SEED_LIMIT = 1 << 64
STREAM_LIMIT = 1 << 32
PERTURB_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def seed_to_int64(seed: int, name: str = "seed") -> int:
    """Check ``0 <= seed < 2^64`` and return its two's-complement int64 (the ops' encoding)."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name}: expected an int in [0, 2**64), got {type(seed).__name__}")
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name}: must lie in [0, 2**64), got {seed}")
    return seed - SEED_LIMIT if seed >= (1 << 63) else seed


def seed_from_int64(seed: int) -> int:
    """Inverse of :func:`seed_to_int64`."""
    return seed & (SEED_LIMIT - 1)


def check_stream(first_stream: int, count: int, name: str = "first_stream") -> int:
    if isinstance(first_stream, bool) or not isinstance(first_stream, int):
        raise TypeError(f"{name}: expected an int, got {type(first_stream).__name__}")
    if first_stream < 0 or first_stream + max(count, 1) - 1 >= STREAM_LIMIT:
        raise ValueError(
            f"{name}: streams {first_stream}..{first_stream + max(count, 1) - 1} must lie in [0, 2**32)"
        )
    return first_stream


def check_tensor_list(
    tensors: Sequence[torch.Tensor], name: str, dtypes: tuple[torch.dtype, ...] = PERTURB_DTYPES
) -> list[torch.Tensor]:
    """A list of contiguous tensors of the accepted dtypes, all on one device."""
    if isinstance(tensors, torch.Tensor) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name}: expected a list of tensors, got {type(tensors).__name__}")
    out = list(tensors)
    device = None
    for k, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{k}]: expected a tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            accepted = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name}[{k}]: dtype {str(t.dtype).replace('torch.', '')} is not supported ({accepted})")
        if device is None:
            device = t.device
        elif t.device != device:
            raise ValueError(f"{name}[{k}]: on {t.device}, but {name}[0] is on {device}; all must share one device")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{k}]: must be contiguous (the noise follows the flat row-major index)")
    return out


def per_tensor(value: float | Sequence[float], count: int, name: str) -> list[float]:
    """A float, or one finite float per tensor, as a list of ``count`` floats."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [float(value)] * count
    elif isinstance(value, Sequence) and not isinstance(value, str):
        values = [float(v) for v in value]
        if len(values) != count:
            raise ValueError(f"{name}: expected a float or {count} values (one per tensor), got {len(values)}")
    else:
        raise TypeError(f"{name}: expected a float or a list of floats, got {type(value).__name__}")
    for k, v in enumerate(values):
        if not math.isfinite(v):
            raise ValueError(f"{name}[{k}]: must be finite, got {v}")
    return values
