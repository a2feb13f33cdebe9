"""The ``lorenza_kernels`` torch.library namespace: every schema, declared once, with its fake.

Each op is a ``torch.library.custom_op`` whose body hands the call to the backend registry
(``_registry.dispatch``), which picks the implementation for the device of the op's tensors. The
fake implementations check shapes with ``torch._check`` and allocate outputs, so the ops work on
the meta device and under ``torch.compile``.

Seeds travel as int64: the public API maps a seed in [0, 2^64) to its two's-complement int64, and
the kernels read the same 64 bits back as an unsigned key.
"""

from __future__ import annotations

import torch

from . import _registry
from ._shapes import matrix_dims


def _device_type(tensors: list[torch.Tensor]) -> str:
    return tensors[0].device.type if tensors else "cpu"


# --- seeded perturbation regeneration (kernels.md section 1) -------------------------------------


@torch.library.custom_op(
    "lorenza_kernels::seeded_axpby_",
    mutates_args=("tensors",),
    schema="(Tensor(a!)[] tensors, int seed, float[] alpha, float[] beta, int first_stream, "
    "Tensor[]? row_vectors=None, float[]? gamma=None) -> Tensor",
)
def seeded_axpby_(
    tensors: list[torch.Tensor],
    seed: int,
    alpha: list[float],
    beta: list[float],
    first_stream: int,
    row_vectors: list[torch.Tensor] | None = None,
    gamma: list[float] | None = None,
) -> torch.Tensor:
    return _registry.dispatch(
        "seeded_axpby_", _device_type(tensors), tensors, seed, alpha, beta, first_stream, row_vectors, gamma
    )


@seeded_axpby_.register_fake
def _(tensors, seed, alpha, beta, first_stream, row_vectors=None, gamma=None):
    n = len(tensors)
    torch._check(len(alpha) == n, lambda: f"alpha: expected {n} values, got {len(alpha)}")
    torch._check(len(beta) == n, lambda: f"beta: expected {n} values, got {len(beta)}")
    if row_vectors is not None:
        torch._check(len(row_vectors) == n, lambda: f"row_vectors: expected {n} tensors, got {len(row_vectors)}")
        torch._check(gamma is not None and len(gamma) == n, lambda: f"gamma: expected {n} values")
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.empty(n, dtype=torch.float32, device=device)


@torch.library.custom_op(
    "lorenza_kernels::seeded_colsum",
    mutates_args=(),
    schema="(Tensor[] tensors, int seed, int first_stream) -> Tensor[]",
)
def seeded_colsum(tensors: list[torch.Tensor], seed: int, first_stream: int) -> list[torch.Tensor]:
    return _registry.dispatch("seeded_colsum", _device_type(tensors), tensors, seed, first_stream)


@seeded_colsum.register_fake
def _(tensors, seed, first_stream):
    return [torch.empty(matrix_dims(t)[1], dtype=torch.float32, device=t.device) for t in tensors]


# --- batched randomized SVD (kernels.md section 3) -----------------------------------------------
# A is a batch (B, m, n) of any float dtype and any strides; member b draws its sketch Omega (n x k)
# from stream streams[b]. randomized_range returns the right basis (B, n, rank); the left basis of A
# is the right basis of the view A.mT. Outputs are float32.


def _check_rsvd_args(A: torch.Tensor, rank: int, streams: list[int]) -> None:
    torch._check(A.dim() == 3, lambda: f"A: expected a batch (B, m, n), got {A.dim()} dims")
    torch._check(len(streams) == A.shape[0], lambda: f"streams: expected {A.shape[0]} values, got {len(streams)}")
    torch._check(1 <= rank, lambda: f"rank: must be >= 1, got {rank}")
    torch._check(rank <= A.shape[1] and rank <= A.shape[2], lambda: f"rank: must be <= min(m, n), got {rank}")


@torch.library.custom_op(
    "lorenza_kernels::rsvd_sketch", mutates_args=(), schema="(Tensor A, int k, int seed, int[] streams) -> Tensor"
)
def rsvd_sketch(A: torch.Tensor, k: int, seed: int, streams: list[int]) -> torch.Tensor:
    return _registry.dispatch("rsvd_sketch", A.device.type, A, k, seed, streams)


@rsvd_sketch.register_fake
def _(A, k, seed, streams):
    torch._check(A.dim() == 3, lambda: f"A: expected a batch (B, m, n), got {A.dim()} dims")
    torch._check(len(streams) == A.shape[0], lambda: f"streams: expected {A.shape[0]} values, got {len(streams)}")
    return A.new_empty((A.shape[0], A.shape[1], k), dtype=torch.float32)


@torch.library.custom_op(
    "lorenza_kernels::randomized_range",
    mutates_args=(),
    schema="(Tensor A, int rank, int oversample, int power_iters, int seed, int[] streams) -> Tensor",
)
def randomized_range(
    A: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int, streams: list[int]
) -> torch.Tensor:
    return _registry.dispatch("randomized_range", A.device.type, A, rank, oversample, power_iters, seed, streams)


@randomized_range.register_fake
def _(A, rank, oversample, power_iters, seed, streams):
    _check_rsvd_args(A, rank, streams)
    return A.new_empty((A.shape[0], A.shape[2], rank), dtype=torch.float32)


@torch.library.custom_op(
    "lorenza_kernels::randomized_svd",
    mutates_args=(),
    schema="(Tensor A, int rank, int oversample, int power_iters, int seed, int[] streams) -> (Tensor, Tensor, Tensor)",
)
def randomized_svd(
    A: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int, streams: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _registry.dispatch("randomized_svd", A.device.type, A, rank, oversample, power_iters, seed, streams)


@randomized_svd.register_fake
def _(A, rank, oversample, power_iters, seed, streams):
    _check_rsvd_args(A, rank, streams)
    nb, m, n = A.shape
    f32 = torch.float32
    U = A.new_empty((nb, m, rank), dtype=f32)
    return U, A.new_empty((nb, rank), dtype=f32), A.new_empty((nb, rank, n), dtype=f32)
