"""Subspace selection of the projected optimizers (LORENZA, Lorenza+, GaLore-AdamW).

One function, :func:`refresh_bases`, turns gradients into orthonormal bases, so that the
optimizers never care which SVD produced them:

* ``svd="exact"``: ``torch.linalg.svd`` of the float32 gradient, matrix by matrix, truncated to
  the top ``rank`` singular vectors. This is exactly GaLore's ``get_orthogonal_matrix``
  (https://github.com/jiaweizzhao/GaLore, ``galore_torch/galore_projector.py``): same call, same
  float32 input, same LAPACK signs, so GaLore-AdamW reproduces the ``galore-torch`` package.
* ``svd="randomized"``: the project's batched randomized SVD (``kernels.md`` section 3),
  ``lorenza_kernels.randomized_range_list``: ALL matrices in one call, grouped by shape inside it.
  Matrix ``i`` of the list is sketched from stream ``first_stream + i`` of ``seed``.

Shapes (``algorithms.md``, GaLore's side rule): a parameter is viewed as ``m x n`` (``shape[0] x
rest``); if ``m >= n`` the basis is on the right (``Q`` is ``n x r``, ``R = G Q``), otherwise on
the left (``Q`` is ``m x r``, ``R = Q^T G``). Bases are float32, contiguous, ``d x r``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

import lorenza_kernels as lk

__all__ = ["SVDS", "matrix_dims", "refresh_bases", "side_for", "subspace_dims"]

SVDS = ("exact", "randomized")


def matrix_dims(p: torch.Tensor) -> tuple[int, int]:
    """``(m, n)`` of the matrix view of a tensor of 2 or more dimensions: ``shape[0] x rest``."""
    return p.shape[0], math.prod(p.shape[1:])


def side_for(m: int, n: int) -> str:
    """GaLore's rule: project from the right when ``m >= n``, from the left otherwise."""
    return "right" if m >= n else "left"


def subspace_dims(m: int, n: int, rank: int) -> tuple[str, tuple[int, int], tuple[int, int]]:
    """``(side, Q's shape, R's shape)`` of an ``m x n`` matrix projected to ``rank``."""
    side = side_for(m, n)
    if side == "right":
        return side, (n, rank), (m, rank)
    return side, (m, rank), (rank, n)


def _exact(A: torch.Tensor, rank: int, side: str) -> torch.Tensor:
    # GaLore calls torch.linalg.svd on the float32 matrix (a copy only when it is not float32).
    U, _, Vh = torch.linalg.svd(A if A.dtype == torch.float32 else A.float(), full_matrices=False)
    return (U[:, :rank] if side == "left" else Vh[:rank].t()).contiguous()


@torch.no_grad()
def refresh_bases(
    matrices: Sequence[torch.Tensor],
    ranks: Sequence[int],
    sides: Sequence[str],
    *,
    svd: str,
    seed: int,
    oversample: int = 8,
    power_iters: int = 1,
    first_stream: int = 0,
) -> list[torch.Tensor]:
    """Orthonormal bases of the dominant rank-``ranks[i]`` subspace of every ``matrices[i]`` (2-D).

    ``sides[i]`` is ``"left"`` (``m x r``) or ``"right"`` (``n x r``). Returns float32 bases in
    input order. ``seed``, ``oversample``, ``power_iters`` and ``first_stream`` only matter for
    ``svd="randomized"`` (matrix ``i`` uses stream ``first_stream + i``).
    """
    if svd == "exact":
        return [_exact(A, r, s) for A, r, s in zip(matrices, ranks, sides)]
    if svd != "randomized":
        raise ValueError(f"svd: expected one of {SVDS}, got {svd!r}")
    if not matrices:
        return []
    bases = lk.randomized_range_list(
        list(matrices),
        list(ranks),
        sides=list(sides),
        oversample=oversample,
        power_iters=power_iters,
        seed=seed,
        first_stream=first_stream,
    )
    return [Q if Q.is_contiguous() else Q.contiguous() for Q in bases]
