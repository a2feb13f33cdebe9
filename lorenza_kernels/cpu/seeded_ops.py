"""CPU implementations of the seeded perturbation ops: the C++/OpenMP kernels of ``_C``.

The public API (``lorenza_kernels.seeded_ops``) has validated the arguments already: contiguous
tensors of float32/bfloat16/float16 on one device, row vectors as contiguous float32, streams in
range. Here the tensors become raw addresses for the torch-free kernels
(``csrc/cpu/seeded_ops.cpp``), which release the GIL and use ``torch.get_num_threads()`` OpenMP
threads; every result is bit-identical for any thread count.
"""

from __future__ import annotations

import torch

from .._checks import seed_from_int64
from .._dtypes import CODES, code
from .._ext import _C
from .._registry import register
from .._shapes import matrix_dims


def _ncols(t: torch.Tensor) -> int:
    return max(matrix_dims(t)[1], 1) if t.numel() else 1


def _check(tensors: list[torch.Tensor], rows: list[torch.Tensor] | None) -> None:
    """The kernels read raw memory: re-check what a direct ``torch.ops`` call could get wrong (O(K))."""
    for k, t in enumerate(tensors):
        if t.device.type != "cpu" or t.dtype not in CODES or not t.is_contiguous():
            raise ValueError(f"tensors[{k}]: expected a contiguous CPU float32/bfloat16/float16 tensor")
        if rows is not None and rows[k].numel() != matrix_dims(t)[1]:
            raise ValueError(f"row_vectors[{k}]: expected {matrix_dims(t)[1]} values, got {rows[k].numel()}")


@register("seeded_axpby_", "cpu", "cpu")
def seeded_axpby_(
    tensors: list[torch.Tensor],
    seed: int,
    alpha: list[float],
    beta: list[float],
    first_stream: int,
    row_vectors: list[torch.Tensor] | None = None,
    gamma: list[float] | None = None,
) -> torch.Tensor:
    """``t_k <- beta_k t_k + alpha_k z_k [+ gamma_k 1 a_k^T]`` in place; returns ``sum(z_k^2)``."""
    k = len(tensors)
    norms = torch.empty(k, dtype=torch.float32)
    if k == 0:
        return norms
    rows = None
    if row_vectors is not None and gamma is not None:
        rows = [r.to(device="cpu", dtype=torch.float32).contiguous() for r in row_vectors]  # no-ops normally
        row_ptrs = [r.data_ptr() if r.numel() else 0 for r in rows]
        gammas = [float(g) for g in gamma]
    else:
        row_ptrs, gammas = [0] * k, [0.0] * k
    _check(tensors, rows)
    _C.seeded_axpby_cpu(
        [t.data_ptr() for t in tensors],
        [t.numel() for t in tensors],
        [code(t.dtype) for t in tensors],
        [_ncols(t) for t in tensors],
        seed_from_int64(seed),
        first_stream,
        [float(a) for a in alpha],
        [float(b) for b in beta],
        row_ptrs,
        gammas,
        norms.data_ptr(),
        torch.get_num_threads(),
    )
    del rows  # alive until the kernel has returned
    return norms


@register("seeded_colsum", "cpu", "cpu")
def seeded_colsum(tensors: list[torch.Tensor], seed: int, first_stream: int) -> list[torch.Tensor]:
    """Column sums of ``z_k`` viewed as ``m x n`` (float32, length n); tensor data is not read."""
    dims = [matrix_dims(t) for t in tensors]  # shapes only: any dtype, any layout
    outs = [torch.empty(n, dtype=torch.float32) for _, n in dims]
    if tensors:
        _C.seeded_colsum_cpu(
            [t.numel() for t in tensors],
            [n for _, n in dims],
            seed_from_int64(seed),
            first_stream,
            [o.data_ptr() for o in outs],
            torch.get_num_threads(),
        )
    return outs
