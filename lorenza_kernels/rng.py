"""Public access to the lorenza-philox-v1 Gaussian stream (``shared/docs/rng.md``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, _ops


def gaussian(
    shape: int | Sequence[int] | torch.Size,
    seed: int,
    stream: int = 0,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """A tensor of standard normals from the seeded stream, identical on every backend.

    Element ``i`` (flat row-major index) is ``z_i`` of stream ``(seed, stream)``: Philox4x32-10 on
    the counter ``(i >> 2, stream, 0)`` keyed by ``seed``, then Box-Muller, computed in float32
    and rounded once to ``dtype`` (float32, bfloat16 or float16). ``seed`` lies in [0, 2^64),
    ``stream`` in [0, 2^32).
    """
    if isinstance(shape, int):
        shape = (shape,)
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"shape: sizes must be non-negative, got {shape}")
    if dtype not in _checks.PERTURB_DTYPES:
        raise TypeError(f"dtype: {dtype} is not supported (float32, bfloat16, float16)")
    seed64 = _checks.seed_to_int64(seed)
    _checks.check_stream(stream, 1, "stream")
    out = torch.empty(shape, dtype=dtype, device=device)
    _ops.seeded_axpby_([out], seed64, [1.0], [0.0], stream)
    return out
