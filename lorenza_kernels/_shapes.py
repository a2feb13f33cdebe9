"""Shape conventions shared by every layer, defined once (``docs/kernels.md``, "Conventions")."""

from __future__ import annotations

import math

import torch

#: Sides of a projection: the basis ``Q`` multiplies the gradient from the left (``Q^T G``) or
#: from the right (``G Q``).
SIDES = ("left", "right")
#: What happens to Adam's moments when the basis changes (``moment_transform_``).
MODES = ("rotate", "keep", "reset")


def matrix_dims(t: torch.Tensor) -> tuple[int, int]:
    """(m, n) of the matrix view of ``t``: ``shape[0] x rest`` for 2+ dims, ``1 x numel`` otherwise.

    This is the view LOREN's row vectors and LORENZA's projections use for tensors of more than two
    dimensions. Element ``i`` of the flat row-major order sits in column ``i % n``.
    """
    shape = t.shape
    if len(shape) >= 2:
        return shape[0], math.prod(shape[1:])
    return 1, t.numel()


def projection_side(m: int, n: int) -> str:
    """GaLore's rule: project an ``m x n`` matrix from the right when ``m >= n``, else from the left,
    so that the basis and the moments live on the short side (``docs/algorithms.md``)."""
    return "right" if m >= n else "left"


def projected_shapes(m: int, n: int, rank: int, side: str) -> tuple[tuple[int, int], tuple[int, int]]:
    """(shape of the basis Q, shape of R and of the moments) of an ``m x n`` matrix at ``rank``."""
    if side == "right":
        return (n, rank), (m, rank)
    return (m, rank), (rank, n)
