"""Reference seeded perturbation ops: the meaning every fast backend is tested against.

``seeded_axpby_``: for every tensor ``t_k`` of the list, with ``z_k`` the Gaussian stream
``(seed, streams[k])`` (``docs/rng.md``) in ``t_k``'s flat row-major order,

    t_k <- beta_k t_k + alpha_k z_k + gamma_k 1 a_k^T       (the last term only with row vectors)

computed in float32 and rounded once to ``t_k``'s dtype. ``beta_k == 0`` does not read ``t_k``
(NaN or Inf in it is not propagated, as in BLAS). Returns ``sum(z_k^2)`` per tensor (float32).

``seeded_colsum``: the column sums of ``z_k`` viewed as ``m x n`` (``_shapes.matrix_dims``),
float32, without touching the tensors.
"""

from __future__ import annotations

import torch

from .._registry import register
from .._shapes import matrix_dims
from .rng import CHUNK, gaussian_range


def _device(tensors: list[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


@register("seeded_axpby_", "reference", "any")
def seeded_axpby_(
    tensors: list[torch.Tensor],
    seed: int,
    streams: list[int],
    alpha: list[float],
    beta: list[float],
    row_vectors: list[torch.Tensor] | None = None,
    gamma: list[float] | None = None,
) -> torch.Tensor:
    device = _device(tensors)
    norms = torch.zeros(len(tensors), dtype=torch.float64, device=device)
    for k, t in enumerate(tensors):
        flat = t.view(-1)
        n_cols = matrix_dims(t)[1]
        row = row_vectors[k].to(torch.float32) if row_vectors is not None else None
        for s in range(0, flat.numel(), CHUNK):
            e = min(s + CHUNK, flat.numel())
            z = gaussian_range(s, e, seed, streams[k], device=device)
            norms[k] += z.double().square().sum()
            new = z * alpha[k]
            if beta[k] != 0.0:
                new = flat[s:e].float() * beta[k] + new
            if row is not None and gamma is not None and gamma[k] != 0.0:
                cols = torch.arange(s, e, device=device) % n_cols
                new = new + row[cols] * gamma[k]
            flat[s:e].copy_(new)
    return norms.float()


@register("seeded_colsum", "reference", "any")
def seeded_colsum(tensors: list[torch.Tensor], seed: int, streams: list[int]) -> list[torch.Tensor]:
    device = _device(tensors)
    out = []
    for k, t in enumerate(tensors):
        n_cols = matrix_dims(t)[1]
        acc = torch.zeros(n_cols, dtype=torch.float64, device=device)
        for s in range(0, t.numel(), CHUNK):
            e = min(s + CHUNK, t.numel())
            z = gaussian_range(s, e, seed, streams[k], device=device)
            acc.index_add_(0, torch.arange(s, e, device=device) % n_cols, z.double())
        out.append(acc.float())
    return out
