"""Shape conventions shared by every layer."""

from __future__ import annotations

import torch


def matrix_dims(t: torch.Tensor) -> tuple[int, int]:
    """(m, n) of the matrix view of ``t``: ``shape[0] x rest`` for 2+ dims, ``1 x numel`` otherwise.

    This is the view LOREN's row vectors and LORENZA's projections use for tensors of more than two
    dimensions (algorithms.md). Element ``i`` of the flat row-major order sits in column ``i % n``.
    """
    if t.dim() >= 2:
        rest = 1
        for s in t.shape[1:]:
            rest *= s
        return t.shape[0], rest
    return 1, t.numel()
