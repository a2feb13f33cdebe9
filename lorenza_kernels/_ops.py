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


# --- fused projected Adam and the moment transform (kernels.md section 2) ------------------------
# Lists so that one call updates a batch of same-shape layers; the public API (projected_adam.py)
# validates everything before these run, the fakes only re-check the shapes.


def _projected_shapes(p: torch.Tensor, q: torch.Tensor, side: str) -> tuple[tuple[int, int], int, tuple[int, int]]:
    """((m, n), r, moment shape) of one layer."""
    m, n = matrix_dims(p)
    r = q.shape[-1]
    return (m, n), r, ((r, n) if side == "left" else (m, r))


@torch.library.custom_op(
    "lorenza_kernels::projected_adam_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs"),
    schema="(Tensor(a!)[] params, Tensor[] grads, Tensor[] projs, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, int[] steps, float lr, float beta1, float beta2, float eps, "
    "float weight_decay, float scale, str side, float residual_scale) -> ()",
)
def projected_adam_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    projs: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    side: str,
    residual_scale: float,
) -> None:
    _registry.dispatch(
        "projected_adam_step_", _device_type(params), params, grads, projs, exp_avgs, exp_avg_sqs, steps,
        lr, beta1, beta2, eps, weight_decay, scale, side, residual_scale,
    )  # fmt: skip


@projected_adam_step_.register_fake
def _(params, grads, projs, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, scale, side,
      residual_scale):  # fmt: skip
    k = len(params)
    for name, xs in (("grads", grads), ("projs", projs), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        torch._check(len(xs) == k, lambda name=name, xs=xs: f"{name}: expected {k} tensors, got {len(xs)}")
    torch._check(len(steps) == k, lambda: f"steps: expected {k} values, got {len(steps)}")
    torch._check(side in ("left", "right"), lambda: f"side: expected 'left' or 'right', got {side!r}")
    for i, (p, g, q, ma, va) in enumerate(zip(params, grads, projs, exp_avgs, exp_avg_sqs)):
        (m, n), r, mshape = _projected_shapes(p, q, side)
        torch._check(g.shape == p.shape, lambda i=i: f"grads[{i}]: shape must equal params[{i}]'s")
        rows = m if side == "left" else n
        torch._check(q.dim() == 2 and q.shape[0] == rows, lambda i=i: f"projs[{i}]: expected ({rows}, r)")
        torch._check(tuple(ma.shape) == mshape, lambda i=i: f"exp_avgs[{i}]: expected shape {mshape}")
        torch._check(tuple(va.shape) == mshape, lambda i=i: f"exp_avg_sqs[{i}]: expected shape {mshape}")


@torch.library.custom_op(
    "lorenza_kernels::moment_transform_",
    mutates_args=("exp_avgs", "exp_avg_sqs"),
    schema="(Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, Tensor[] proj_olds, Tensor[] proj_news, "
    "str side, str transform) -> ()",  # not "mode": torch's dispatch-mode machinery takes that name
)
def moment_transform_(
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    proj_olds: list[torch.Tensor],
    proj_news: list[torch.Tensor],
    side: str,
    transform: str,
) -> None:
    _registry.dispatch(
        "moment_transform_", _device_type(exp_avgs), exp_avgs, exp_avg_sqs, proj_olds, proj_news, side, transform
    )


@moment_transform_.register_fake
def _(exp_avgs, exp_avg_sqs, proj_olds, proj_news, side, transform):
    k = len(exp_avgs)
    for name, xs in (("exp_avg_sqs", exp_avg_sqs), ("proj_olds", proj_olds), ("proj_news", proj_news)):
        torch._check(len(xs) == k, lambda name=name, xs=xs: f"{name}: expected {k} tensors, got {len(xs)}")
    torch._check(side in ("left", "right"), lambda: f"side: expected 'left' or 'right', got {side!r}")
    torch._check(transform in ("rotate", "keep", "reset"), lambda: f"mode: unknown mode {transform!r}")
    for i, (ma, va, qo, qn) in enumerate(zip(exp_avgs, exp_avg_sqs, proj_olds, proj_news)):
        torch._check(va.shape == ma.shape, lambda i=i: f"exp_avg_sqs[{i}]: shape must equal exp_avgs[{i}]'s")
        torch._check(qo.shape == qn.shape, lambda i=i: f"proj_news[{i}]: shape must equal proj_olds[{i}]'s")
        r = qo.shape[-1]
        torch._check(ma.shape[0 if side == "left" else 1] == r, lambda i=i: f"exp_avgs[{i}]: rank must be {r}")
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
