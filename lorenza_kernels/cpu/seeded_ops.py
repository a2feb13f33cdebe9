"""CPU implementations of the seeded perturbation ops: the C++/OpenMP kernels of ``_C``.

The op's validator (``_validate.py``) has run: contiguous, non-overlapping tensors of
float32/bfloat16/float16 on one device, streams in range, row vectors of the right length. Here the
tensors become raw addresses for the torch-free kernels (``csrc/cpu/seeded_ops.cpp``), which release
the GIL and use ``torch.get_num_threads()`` OpenMP threads; every result is bit-identical for any
thread count.
"""

from __future__ import annotations

import torch

from .._checks import seed_from_int64
from .._dtypes import CODES
from .._ext import _C
from .._registry import register
from .._shapes import matrix_dims


@register("seeded_axpby_", "cpu", "cpu")
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
    """``t_k <- beta_k t_k + alpha_k z_k [+ gamma_k 1 a_k^T]`` in place; returns ``sum(z_k^2)``.

    With ``rounding_seed``, 16-bit tensors are rounded stochastically (the kernel draws one more
    Philox block per four of their elements, from the rounding stream). ``offsets``: element ``i``
    of ``t_k`` draws stream index ``offsets[k] + i`` (any offset, no alignment needed)."""
    k = len(tensors)
    norms = torch.empty(k, dtype=torch.float32)
    if k == 0:
        return norms
    rows = None
    if row_vectors is None:
        row_ptrs, gammas, ncols = [0] * k, [0.0] * k, [1] * k  # columns matter only for the row term
    else:
        rows = [r if r.dtype == torch.float32 and r.is_contiguous() else r.float().contiguous() for r in row_vectors]
        row_ptrs = [r.data_ptr() if r.numel() else 0 for r in rows]
        gammas = gamma
        ncols = [max(matrix_dims(t)[1], 1) for t in tensors]
    _C.seeded_axpby_cpu(
        [t.data_ptr() for t in tensors],
        [t.numel() for t in tensors],
        [CODES[t.dtype] for t in tensors],
        ncols,
        seed_from_int64(seed),
        streams,
        alpha,
        beta,
        row_ptrs,
        gammas,
        norms.data_ptr(),
        torch.get_num_threads(),
        None if rounding_seed is None else seed_from_int64(rounding_seed),
        offsets,
    )
    del rows  # alive until the kernel has returned
    return norms


@register("seeded_colsum", "cpu", "cpu")
def seeded_colsum(
    tensors: list[torch.Tensor], seed: int, streams: list[int], offsets: list[int] | None = None
) -> list[torch.Tensor]:
    """Column sums of ``z_k`` viewed as ``m x n`` (float32, length n); tensor data is not read.
    ``offsets``: element ``i`` of tensor ``k`` is stream index ``offsets[k] + i``."""
    dims = [matrix_dims(t) for t in tensors]  # shapes only: any dtype, any layout
    outs = [torch.empty(n, dtype=torch.float32) for _, n in dims]
    if tensors:
        _C.seeded_colsum_cpu(
            [t.numel() for t in tensors],
            [n for _, n in dims],
            seed_from_int64(seed),
            streams,
            [o.data_ptr() for o in outs],
            torch.get_num_threads(),
            offsets,
        )
    return outs


def stochastic_round_at(dst: list[torch.Tensor], src: list[torch.Tensor], offsets: list[int], seed: int,
                        streams: list[int]) -> None:  # fmt: skip
    """``dst_k[i] <- SR(src_k[i])`` with the rounding word of index ``offsets[k] + i`` of stream
    ``(seed, streams[k])``: ``dst_k`` is the part of a larger tensor that starts at element
    ``offsets[k]`` (the CPU projected Adam writes W back block by block). Tensors contiguous, src
    float32 of dst's size, no overlap: the callers' validators have checked. ``seed`` is the
    int64 encoding."""
    if dst:
        _C.stochastic_round_cpu(
            [d.data_ptr() for d in dst],
            [s.data_ptr() for s in src],
            [d.numel() for d in dst],
            [CODES[d.dtype] for d in dst],
            offsets,
            seed_from_int64(seed),
            streams,
            torch.get_num_threads(),
        )


@register("stochastic_round_", "cpu", "cpu")
def stochastic_round_(
    dst: list[torch.Tensor], src: list[torch.Tensor], seed: int, streams: list[int], offsets: list[int] | None = None
) -> None:
    """``dst_k <- SR(src_k)`` (docs/rng.md, "The rounding stream"); a copy for a float32 ``dst_k``;
    element ``i`` of ``dst_k`` takes the rounding word ``offsets[k] + i`` (default ``i``)."""
    stochastic_round_at(dst, src, offsets if offsets is not None else [0] * len(dst), seed, streams)
