"""CPU sketch of the randomized SVD: Omega from the C++ Philox kernel, then one BLAS batched GEMM.

The reference generates Omega with int64 torch ops (about 15 % of a CPU refresh); the C++/OpenMP
``seeded_axpby_`` kernel writes the same stream (lorenza-philox-v1, within ``docs/rng.md``'s 1e-5)
many times faster. With ``beta = 0`` it overwrites its tensors with ``alpha z``, so one call over
the (k, n) buffers of the batch, member b on stream ``streams[b]``, writes every
``Omega_b^T = gaussian((k, n), seed, streams[b])``, and ``Y = A Omega`` is a BLAS bmm. Registered
only when the extension's CPU kernels are there.
"""

from __future__ import annotations

import torch

from .._registry import register
from .seeded_ops import seeded_axpby_


@register("rsvd_sketch", "cpu", "cpu")
def rsvd_sketch(A: torch.Tensor, k: int, seed: int, streams: list[int]) -> torch.Tensor:
    """Y_b = A_b Omega_b (float32), Omega from the CPU ``seeded_axpby_`` kernel."""
    omega_t = torch.empty((len(streams), k, A.shape[-1]), dtype=torch.float32)
    if omega_t.numel():
        nb = len(streams)
        seeded_axpby_(list(omega_t.unbind(0)), seed, list(streams), [1.0] * nb, [0.0] * nb)
    return torch.bmm(A.to(torch.float32), omega_t.mT)
