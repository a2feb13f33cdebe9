"""Public seeded perturbation ops (``docs/kernels.md`` section 1): noise regenerated from a seed,
never stored.

These functions only put the arguments in the ops' form (a float or one per tensor, a seed in
[0, 2^64) to its int64 encoding, ``first_stream`` to a list of streams) and call
``torch.ops.lorenza_kernels.*``; the op's validator checks everything else, the same for every caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, _ops

_INT63 = 1 << 63


def _streams(streams: Sequence[int] | None, first_stream: int, n: int) -> list[int]:
    if streams is None and type(first_stream) is int and 0 <= first_stream <= _checks.STREAM_LIMIT - n:
        return list(range(first_stream, first_stream + n))
    return _checks.stream_list(streams, first_stream, n)


def _tensor_list(tensors: Sequence[torch.Tensor], name: str = "tensors") -> list[torch.Tensor]:
    if isinstance(tensors, list):
        return tensors
    if isinstance(tensors, (torch.Tensor, str)) or not isinstance(tensors, Sequence):
        raise TypeError(f"{name}: expected a list of tensors, got {type(tensors).__name__}")
    return list(tensors)


def seeded_axpby_(
    tensors: Sequence[torch.Tensor],
    seed: int,
    alpha: float | Sequence[float],
    beta: float | Sequence[float] = 1.0,
    *,
    streams: Sequence[int] | None = None,
    first_stream: int = 0,
    row_vectors: Sequence[torch.Tensor] | None = None,
    gamma: float | Sequence[float] | None = None,
    rounding_seed: int | None = None,
    offsets: Sequence[int] | None = None,
) -> torch.Tensor:
    """In place, one pass: ``t_k <- beta_k t_k + alpha_k z_k [+ gamma_k 1 a_k^T]``; returns ``sum(z_k^2)``.

    ``z_k = gaussian(t_k.shape, seed, s_k)`` with ``s_k = streams[k]`` (default: ``first_stream + k``).
    The arithmetic is float32 and the result is rounded once to ``t_k``'s dtype (float32, bfloat16,
    float16). ``beta_k == 0`` overwrites ``t_k`` without reading it. With ``row_vectors`` (``a_k`` of
    length n, the columns of ``t_k``'s ``m x n`` view: ``shape[0] x rest``, a 1-D tensor is
    ``1 x numel``) the rank-one term ``gamma_k a_k[j]`` is added to every element of column ``j``
    (LOREN's perturbation). Tensors must be contiguous, share one device and not overlap in memory.
    Returns a float32 tensor of the K squared norms ``sum(z_k^2)``, computed in the same pass.

    ``rounding_seed`` (in [0, 2^64)): bfloat16 and float16 tensors round their float32 result
    stochastically instead of to nearest, element ``i`` of ``t_k`` with the rounding word of stream
    ``(rounding_seed, s_k)`` (``docs/rng.md``, "The rounding stream"): unbiased, ``E[t_k] = v`` for the
    float32 value ``v``, so updates far below half an ulp accumulate in expectation instead of
    vanishing. float32 tensors are unaffected. Costs one more Philox call per 4 elements.

    ``offsets`` (one int >= 0 per tensor, default zeros): element ``i`` of ``t_k`` takes the noise (and
    the rounding word) of index ``offsets[k] + i`` of its streams, i.e. ``t_k`` is treated as the part
    of a larger tensor that starts at that element: a shard of a sharded parameter (FSDP2 splits
    rows, so a shard is a contiguous range of the flat index) gets the noise the whole tensor would
    get there. The rank-one term and the norms follow ``t_k`` itself (a row-aligned shard's columns
    are the full matrix's).
    """
    # Fast paths for the common argument types: this is the hottest call of every optimizer step.
    ts = tensors if type(tensors) is list else _tensor_list(tensors)
    n = len(ts)
    alphas = [alpha] * n if type(alpha) is float else _checks.per_tensor(alpha, n, "alpha")
    betas = [beta] * n if type(beta) is float else _checks.per_tensor(beta, n, "beta")
    rows = gammas = None
    if row_vectors is not None or gamma is not None:
        if row_vectors is None or gamma is None:
            raise ValueError("row_vectors, gamma: give both or neither")
        rows = _tensor_list(row_vectors, "row_vectors")
        gammas = _checks.per_tensor(gamma, n, "gamma")
    seed64 = seed if type(seed) is int and 0 <= seed < _INT63 else _checks.seed_to_int64(seed)
    streams = _streams(streams, first_stream, n)
    rseed64 = None if rounding_seed is None else _checks.seed_to_int64(rounding_seed, "rounding_seed")
    if offsets is None:
        if rseed64 is None:
            return _ops.seeded_axpby_(ts, seed64, streams, alphas, betas, rows, gammas)
        return _ops.seeded_axpby_(ts, seed64, streams, alphas, betas, rows, gammas, rseed64)
    offs = _checks.offset_list(offsets, n)
    return _ops.seeded_axpby_(ts, seed64, streams, alphas, betas, rows, gammas, rseed64, offs)


def stochastic_round_(
    dst: Sequence[torch.Tensor],
    src: Sequence[torch.Tensor],
    seed: int,
    *,
    streams: Sequence[int] | None = None,
    first_stream: int = 0,
    offsets: Sequence[int] | None = None,
) -> None:
    """In place ``dst_k <- SR(src_k)``: float32 values rounded stochastically, reproducibly from a seed.

    Element ``i`` (flat row-major index) of ``dst_k`` gets ``src_k[i]`` rounded down or up to a
    neighbouring value of ``dst_k``'s dtype, up with probability equal to the distance from the
    lower one in ulps, decided by the rounding word of index ``i`` of stream ``(seed, s_k)``,
    ``s_k = streams[k]`` (default: ``first_stream + k``) (``docs/rng.md``, "The rounding stream").
    Unbiased: ``E[dst_k] = src_k``; NaN, Inf, values beyond the dtype's largest finite value and,
    for bfloat16, values below 2^-126 in magnitude are rounded to nearest. ``dst_k``: bfloat16 or
    float16 (a float32 ``dst_k`` gets a plain copy); ``src_k``: float32 of the same shape, both
    contiguous on one device. No ``dst_k`` may overlap another ``dst`` or any ``src``. The result
    is bitwise the same on every backend. Used to write back the float32 image of a low-precision
    parameter after an update. ``offsets`` (one per pair): element ``i`` of ``dst_k`` takes the
    rounding word ``offsets[k] + i`` (a shard of a larger tensor, as in :func:`seeded_axpby_`).
    """
    ds = dst if type(dst) is list else _tensor_list(dst, "dst")
    ss = src if type(src) is list else _tensor_list(src, "src")
    seed64 = seed if type(seed) is int and 0 <= seed < _INT63 else _checks.seed_to_int64(seed)
    streams_ = _streams(streams, first_stream, len(ds))
    if offsets is None:
        _ops.stochastic_round_(ds, ss, seed64, streams_)
    else:
        _ops.stochastic_round_(ds, ss, seed64, streams_, _checks.offset_list(offsets, len(ds)))


def seeded_colsum(
    tensors: Sequence[torch.Tensor],
    seed: int,
    *,
    streams: Sequence[int] | None = None,
    first_stream: int = 0,
    offsets: Sequence[int] | None = None,
) -> list[torch.Tensor]:
    """Column sums of ``z_k`` viewed as ``m x n`` (float32, length n), reading no tensor data.

    Only the shapes and the device of ``tensors`` are used; streams and ``offsets`` as
    :func:`seeded_axpby_` (with offsets, the sums over this shard's rows of the larger tensor).
    """
    ts = tensors if type(tensors) is list else _tensor_list(tensors)
    seed64 = seed if type(seed) is int and 0 <= seed < _INT63 else _checks.seed_to_int64(seed)
    streams_ = _streams(streams, first_stream, len(ts))
    if offsets is None:
        return _ops.seeded_colsum(ts, seed64, streams_)
    return _ops.seeded_colsum(ts, seed64, streams_, _checks.offset_list(offsets, len(ts)))


def seeded_loren_stats(
    tensors: Sequence[torch.Tensor],
    seed: int,
    row_vectors: Sequence[torch.Tensor],
    *,
    streams: Sequence[int] | None = None,
    first_stream: int = 0,
    offsets: Sequence[int] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """LOREN's per-tensor statistics of the noise: ``(p, colsums)``.

    ``p_k = <a_bar_k, z_k> = sum_ij a_k[j] z_k[i, j]`` (a float32 tensor of K values), where
    ``a_bar_k`` repeats the row vector ``a_k`` over the m rows, and ``colsums[k] = 1^T z_k``.
    Since ``<a_bar, z> = <a, 1^T z>``, ``p`` follows from the column sums with no second pass.
    With ``offsets`` (shards of larger tensors, as :func:`seeded_axpby_`) both are this shard's
    partial sums: the whole tensor's are their sums over the shards.
    """
    ts = _tensor_list(tensors)
    rows = _tensor_list(row_vectors, "row_vectors")
    if len(rows) != len(ts):
        raise ValueError(f"row_vectors: expected {len(ts)} vectors (one per tensor), got {len(rows)}")
    colsums = seeded_colsum(ts, seed, streams=streams, first_stream=first_stream, offsets=offsets)
    for k, (a, c) in enumerate(zip(rows, colsums)):
        if not isinstance(a, torch.Tensor) or a.dim() != 1 or a.shape != c.shape or a.device != c.device:
            want = f"a vector of {c.numel()} values on {c.device}"
            got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
            raise ValueError(f"row_vectors[{k}]: expected {want} (the columns of the tensor's m x n view), got {got}")
    if not ts:
        return torch.empty(0, dtype=torch.float32), colsums
    p = torch.stack([torch.dot(a.to(torch.float32), c) for a, c in zip(rows, colsums)])
    return p, colsums
