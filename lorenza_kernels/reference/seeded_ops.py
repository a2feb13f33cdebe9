"""Reference seeded perturbation ops: the meaning every fast backend is tested against.

``seeded_axpby_``: for every tensor ``t_k`` of the list, with ``z_k`` the Gaussian stream
``(seed, streams[k])`` (``docs/rng.md``) in ``t_k``'s flat row-major order,

    t_k <- beta_k t_k + alpha_k z_k + gamma_k 1 a_k^T       (the last term only with row vectors)

computed in float32 and rounded once to ``t_k``'s dtype: to nearest even, or, with a
``rounding_seed`` and a bfloat16/float16 ``t_k``, stochastically with the rounding stream
``(rounding_seed, streams[k])`` (``docs/rng.md``, "The rounding stream"). ``beta_k == 0`` does not
read ``t_k`` (NaN or Inf in it is not propagated, as in BLAS). Returns ``sum(z_k^2)`` per tensor
(float32).

``seeded_colsum``: the column sums of ``z_k`` viewed as ``m x n`` (``_shapes.matrix_dims``),
float32, without touching the tensors.

``stochastic_round_``: ``dst_k <- SR(src_k)``, the float32 ``src_k`` rounded stochastically to
``dst_k``'s dtype with the rounding stream ``(seed, streams[k])`` (a copy for a float32 ``dst_k``).

``offsets`` (every op, default zeros): element ``i`` of tensor ``k`` takes the noise and the rounding
word of index ``offsets[k] + i`` of its streams, as if it were the part of a larger tensor that starts
at that element (a shard of a sharded parameter). The row-vector term and the column sums follow
the tensor's own ``m x n`` view.
"""

from __future__ import annotations

import torch

from .._registry import register
from .._shapes import matrix_dims
from .rng import CHUNK, gaussian_range, rounding_words, stochastic_round


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
    rounding_seed: int | None = None,
    offsets: list[int] | None = None,
) -> torch.Tensor:
    device = _device(tensors)
    norms = torch.zeros(len(tensors), dtype=torch.float64, device=device)
    for k, t in enumerate(tensors):
        flat = t.view(-1)
        n_cols = matrix_dims(t)[1]
        row = row_vectors[k].to(torch.float32) if row_vectors is not None else None
        o = offsets[k] if offsets is not None else 0
        for s in range(0, flat.numel(), CHUNK):
            e = min(s + CHUNK, flat.numel())
            z = gaussian_range(o + s, o + e, seed, streams[k], device=device)
            norms[k] += z.double().square().sum()
            new = z * alpha[k]
            if beta[k] != 0.0:
                new = flat[s:e].float() * beta[k] + new
            if row is not None and gamma is not None and gamma[k] != 0.0:
                cols = torch.arange(s, e, device=device) % n_cols
                new = new + row[cols] * gamma[k]
            if rounding_seed is not None and t.dtype != torch.float32:
                words = rounding_words(o + s, o + e, rounding_seed, streams[k], device=device)
                new = stochastic_round(new, words, t.dtype)
            flat[s:e].copy_(new)
    return norms.float()


@register("seeded_colsum", "reference", "any")
def seeded_colsum(
    tensors: list[torch.Tensor], seed: int, streams: list[int], offsets: list[int] | None = None
) -> list[torch.Tensor]:
    device = _device(tensors)
    out = []
    for k, t in enumerate(tensors):
        n_cols = matrix_dims(t)[1]
        o = offsets[k] if offsets is not None else 0
        acc = torch.zeros(n_cols, dtype=torch.float64, device=device)
        for s in range(0, t.numel(), CHUNK):
            e = min(s + CHUNK, t.numel())
            z = gaussian_range(o + s, o + e, seed, streams[k], device=device)
            acc.index_add_(0, torch.arange(s, e, device=device) % n_cols, z.double())
        out.append(acc.float())
    return out


@register("stochastic_round_", "reference", "any")
def stochastic_round_(
    dst: list[torch.Tensor], src: list[torch.Tensor], seed: int, streams: list[int], offsets: list[int] | None = None
) -> None:
    for k, (d, x, stream) in enumerate(zip(dst, src, streams)):
        flat, values = d.view(-1), x.view(-1)
        o = offsets[k] if offsets is not None else 0
        for s in range(0, flat.numel(), CHUNK):
            e = min(s + CHUNK, flat.numel())
            words = rounding_words(o + s, o + e, seed, stream, device=d.device)
            flat[s:e].copy_(stochastic_round(values[s:e], words, d.dtype))
