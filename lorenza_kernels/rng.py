"""Public access to the lorenza-philox-v1 Gaussian stream (``docs/rng.md``)."""

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
    offset: int = 0,
) -> torch.Tensor:
    """A tensor of standard normals from the seeded stream, identical on every backend.

    Element ``i`` (flat row-major index) is ``z_i`` of stream ``(seed, stream)``: Philox4x32-10 on
    the counter ``(i >> 2, stream, 0)`` keyed by ``seed``, then Box-Muller, computed in float32
    and rounded once to ``dtype`` (float32, bfloat16 or float16). ``seed`` lies in [0, 2^64),
    ``stream`` in [0, 2^32); both may be any integral type. ``offset``: element ``i`` is ``z_{offset + i}``
    instead (the part of a larger tensor that starts at element ``offset``).
    """
    if isinstance(shape, (torch.Size, tuple, list)):
        dims = tuple(_checks.as_int(s, f"shape[{k}]") for k, s in enumerate(shape))
    else:
        dims = (_checks.as_int(shape, "shape"),)
    if any(s < 0 for s in dims):
        raise ValueError(f"shape: sizes must be non-negative, got {dims}")
    if dtype not in _checks.PERTURB_DTYPES:
        raise TypeError(f"dtype: {dtype} is not supported ({_checks.dtype_names(_checks.PERTURB_DTYPES)})")
    seed64 = _checks.seed_to_int64(seed)
    stream = _checks.as_int(stream, "stream")
    if not 0 <= stream < _checks.STREAM_LIMIT:
        raise ValueError(f"stream: must lie in [0, 2**32), got {stream}")
    out = torch.empty(dims, dtype=dtype, device=device)
    if offset == 0:
        _ops.seeded_axpby_([out], seed64, [stream], [1.0], [0.0], None, None)
    else:
        _ops.seeded_axpby_([out], seed64, [stream], [1.0], [0.0], None, None, None, [_checks.as_int(offset, "offset")])
    return out
