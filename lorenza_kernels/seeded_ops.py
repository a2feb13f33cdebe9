"""Public seeded perturbation ops (kernels.md section 1): noise regenerated from a seed, never stored."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, _ops
from ._shapes import matrix_dims

_ANY_FLOAT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_inplace(tensors: list[torch.Tensor], name: str) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(f"{name}: tensors that require grad are updated in place; call under torch.no_grad()")


def _check_row_vectors(
    row_vectors: Sequence[torch.Tensor], tensors: list[torch.Tensor], name: str = "row_vectors"
) -> list[torch.Tensor]:
    if isinstance(row_vectors, torch.Tensor) or not isinstance(row_vectors, Sequence):
        raise TypeError(f"{name}: expected a list of tensors, got {type(row_vectors).__name__}")
    rows = list(row_vectors)
    if len(rows) != len(tensors):
        raise ValueError(f"{name}: expected {len(tensors)} vectors (one per tensor), got {len(rows)}")
    out = []
    for k, (a, t) in enumerate(zip(rows, tensors)):
        if not isinstance(a, torch.Tensor) or a.dtype not in _ANY_FLOAT:
            raise TypeError(f"{name}[{k}]: expected a floating-point tensor")
        if a.device != t.device:
            raise ValueError(f"{name}[{k}]: on {a.device}, but its tensor is on {t.device}")
        n = matrix_dims(t)[1]
        if a.dim() != 1 or a.numel() != n:
            raise ValueError(f"{name}[{k}]: expected shape ({n},) (columns of the tensor's m x n view), got {tuple(a.shape)}")
        out.append(a.to(torch.float32).contiguous())
    return out


def seeded_axpby_(
    tensors: Sequence[torch.Tensor],
    seed: int,
    alpha: float | Sequence[float],
    beta: float | Sequence[float] = 1.0,
    *,
    first_stream: int = 0,
    row_vectors: Sequence[torch.Tensor] | None = None,
    gamma: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """In place, one pass: ``t_k <- beta_k t_k + alpha_k z_k [+ gamma_k 1 a_k^T]``; returns ``sum(z_k^2)``.

    ``z_k = gaussian(t_k.shape, seed, first_stream + k)``. The arithmetic is float32 and the result
    is rounded once to ``t_k``'s dtype (float32, bfloat16, float16). ``beta_k == 0`` overwrites
    ``t_k`` without reading it. With ``row_vectors`` (``a_k`` of length n, the columns of ``t_k``'s
    ``m x n`` view: ``shape[0] x rest``, a 1-D tensor is ``1 x numel``) the rank-one term
    ``gamma_k a_k[j]`` is added to every element of column ``j`` (LOREN's perturbation).
    Tensors must be contiguous and share one device. Returns a float32 tensor of the K squared
    norms ``sum(z_k^2)``, computed in the same pass, on that device.
    """
    ts = _checks.check_tensor_list(tensors, "tensors")
    seed64 = _checks.seed_to_int64(seed)
    _checks.check_stream(first_stream, len(ts))
    alphas = _checks.per_tensor(alpha, len(ts), "alpha")
    betas = _checks.per_tensor(beta, len(ts), "beta")
    rows, gammas = None, None
    if row_vectors is not None or gamma is not None:
        if row_vectors is None or gamma is None:
            raise ValueError("row_vectors, gamma: give both or neither")
        rows = _check_row_vectors(row_vectors, ts)
        gammas = _checks.per_tensor(gamma, len(ts), "gamma")
    _check_inplace(ts, "tensors")
    return _ops.seeded_axpby_(ts, seed64, alphas, betas, first_stream, rows, gammas)


def seeded_colsum(tensors: Sequence[torch.Tensor], seed: int, *, first_stream: int = 0) -> list[torch.Tensor]:
    """Column sums of ``z_k`` viewed as ``m x n`` (float32, length n), reading no tensor data.

    Only the shapes and the device of ``tensors`` are used.
    """
    ts = _checks.check_tensor_list(tensors, "tensors", _ANY_FLOAT)
    seed64 = _checks.seed_to_int64(seed)
    _checks.check_stream(first_stream, len(ts))
    return _ops.seeded_colsum(ts, seed64, first_stream)


def seeded_loren_stats(
    tensors: Sequence[torch.Tensor],
    seed: int,
    row_vectors: Sequence[torch.Tensor],
    *,
    first_stream: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """LOREN's per-tensor statistics of the noise: ``(p, colsums)``.

    ``p_k = <a_bar_k, z_k> = sum_ij a_k[j] z_k[i, j]`` (a float32 tensor of K values), where
    ``a_bar_k`` repeats the row vector ``a_k`` over the m rows, and ``colsums[k] = 1^T z_k``.
    Since ``<a_bar, z> = <a, 1^T z>``, ``p`` follows from the column sums with no second pass.
    """
    ts = _checks.check_tensor_list(tensors, "tensors", _ANY_FLOAT)
    rows = _check_row_vectors(row_vectors, ts)
    seed64 = _checks.seed_to_int64(seed)
    _checks.check_stream(first_stream, len(ts))
    colsums = _ops.seeded_colsum(ts, seed64, first_stream)
    device = ts[0].device if ts else torch.device("cpu")
    p = torch.stack([torch.dot(a, c) for a, c in zip(rows, colsums)]) if ts else torch.empty(0, device=device)
    return p, colsums
