"""CPU sketch of the randomized SVD: Omega from the C++ Philox kernel, then one BLAS batched GEMM.

The reference generates Omega with int64 torch ops (about 15 % of a CPU refresh); the C++/OpenMP
``seeded_axpby_`` kernel of ``_C`` writes the same stream (lorenza-philox-v1, within rng.md's 1e-5)
many times faster. With ``beta = 0`` it overwrites its tensor with ``alpha z``, so a (k, n) buffer
per batch member becomes ``Omega_b^T = gaussian((k, n), seed, s_b)`` and ``Y = A Omega`` is a BLAS
bmm. Registered only when the extension's CPU kernels are there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import _registry
from .._ext import has_cpu_kernels


def consecutive_runs(streams: list[int]) -> list[tuple[int, int]]:
    """[start, stop) index ranges of ``streams`` whose values go up by one: one generator call each."""
    runs, start = [], 0
    for i in range(1, len(streams) + 1):
        if i == len(streams) or streams[i] != streams[i - 1] + 1:
            runs.append((start, i))
            start = i
    return runs


def sketch_matrix_t(
    streams: list[int], k: int, n: int, seed: int, device: torch.device, generator: Callable
) -> torch.Tensor:
    """(len(streams), k, n) float32 ``Omega_b^T`` written by a ``seeded_axpby_`` implementation.

    A multi-tensor call draws tensor j from stream ``first_stream + j``, so each run of consecutive
    streams (a whole batch, or the matrices of one shape in a layer) is one call.
    """
    out = torch.empty((len(streams), k, n), dtype=torch.float32, device=device)
    if out.numel():
        for a, b in consecutive_runs(streams):
            generator([out[j] for j in range(a, b)], seed, [1.0] * (b - a), [0.0] * (b - a), streams[a])
    return out


def rsvd_sketch(A: torch.Tensor, k: int, seed: int, streams: list[int]) -> torch.Tensor:
    """Y_b = A_b Omega_b (float32), Omega from the CPU ``seeded_axpby_`` kernel."""
    generator = _registry.implementation("seeded_axpby_", "cpu", "cpu")
    omega_t = sketch_matrix_t(streams, k, A.shape[-1], seed, A.device, generator)
    return torch.bmm(A.to(torch.float32), omega_t.mT)


if has_cpu_kernels() and _registry.implementation("seeded_axpby_", "cpu", "cpu") is not None:
    _registry.register("rsvd_sketch", "cpu", "cpu")(rsvd_sketch)
