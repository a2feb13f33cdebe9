"""Public batched randomized SVD (docs/kernels.md section 3): the subspace selection of LORENZA/GaLore.

Halko, Martinsson, Tropp (2011), https://arxiv.org/abs/0909.4061, Algorithm 4.4 with q power
iterations, every product re-orthonormalised by CholeskyQR2 (``reference/rsvd.py`` has the details
and the sources). All arithmetic is float32 whatever the input dtype; outputs are float32.

Which side is sketched: a basis is computed on the side that was *not* sketched, because those
singular vectors come out half a power iteration ahead (the excess over the optimal error halves:
2.2 % instead of 4.5 % at r = 128 on a 1/i spectrum). The right basis (and the SVD) sketches
Y = A Omega with Omega n x k; the left basis sketches A^T (Omega m x k). GaLore's side rule puts the
sketch on the long side and the basis on the short one.

Seed and stream convention (lorenza-philox-v1, ``docs/rng.md``): the matrix at flat batch
index b of ``A[..., m, n]`` (or at list position b of :func:`randomized_range_list`) is sketched
with ``Omega = gaussian((k, d), seed, first_stream + b).T``, k = min(rank + oversample, m, n),
d = n for the right basis and the SVD, d = m for the left basis. The answer for one matrix
therefore depends only on (matrix, rank, side, oversample, power_iters, seed, stream): not on the
batch it is computed in, nor on the device, up to rounding. Singular vectors have a fixed sign:
the entry of largest magnitude of every right singular vector (every column of a basis) is
positive.

Rank: 1 <= rank <= min(m, n). When rank + oversample >= min(m, n) the sketch spans the whole
column space and the answer is exact (up to rounding), so rank = min(m, n) gives the full SVD.
Matrices that are rank-deficient or zero still get an orthonormal basis (the extra directions are
an arbitrary orthonormal completion). NaN or Inf in the input is an error (a basis of a non-finite
matrix means nothing), and so are integer, complex and float64 inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from . import _checks, _ops
from ._shapes import projection_side
from ._validate import NonFiniteError

Side = Literal["left", "right", "auto"]


def _matrix(A: object, name: str, exact_dims: int | None = None) -> torch.Tensor:
    """The structural checks that come before a reshape or a grouping (the op checks the rest)."""
    if not isinstance(A, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(A).__name__}")
    if A.dtype not in _checks.PERTURB_DTYPES:
        names = _checks.dtype_names(_checks.PERTURB_DTYPES)
        raise TypeError(f"{name}: dtype {_checks.dtype_name(A.dtype)} is not supported ({names})")
    if exact_dims is not None and A.dim() != exact_dims:
        raise ValueError(f"{name}: expected a matrix (m, n), got shape {tuple(A.shape)}")
    if A.dim() < 2:
        raise ValueError(f"{name}: expected shape (..., m, n), got {tuple(A.shape)}")
    return A.detach()  # the subspace is never differentiated


def _rank(rank: object, m: int, n: int, name: str = "rank") -> int:
    rank = _checks.int_at_least(rank, name, 1)
    if rank > min(m, n):
        raise ValueError(f"{name}: must be <= min(m, n) = {min(m, n)} for a {m} x {n} matrix, got {rank}")
    return rank


def _side(side: object, m: int, n: int, name: str = "side") -> str:
    _checks.check_choice(side, name, ("left", "right", "auto"))
    return projection_side(m, n) if side == "auto" else side  # type: ignore[return-value]


def _common(oversample: object, power_iters: object, seed: object) -> tuple[int, int, int]:
    return (
        _checks.int_at_least(oversample, "oversample", 0),
        _checks.int_at_least(power_iters, "power_iters", 0),
        _checks.seed_to_int64(seed),
    )


def _batch_streams(first_stream: object, count: int) -> list[int]:
    return _checks.stream_list(None, first_stream, count)


def randomized_svd(
    A: torch.Tensor, rank: int, *, oversample: int = 8, power_iters: int = 1, seed: int = 0, first_stream: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` truncated SVD ``A ~ U diag(S) Vh`` of every matrix of ``A`` (..., m, n).

    Y = A Omega, q = ``power_iters`` times Y <- A orth(A^T orth(Y)), Q = orth(Y), B = Q^T A,
    B = U_B S Vh, U = Q U_B; the top ``rank`` triplets are returned: U (..., m, rank),
    S (..., rank) descending, Vh (..., rank, n), all float32. Omega (n x k, k = rank + oversample)
    of batch member b comes from stream ``first_stream + b`` (module docstring). Vh is the more
    accurate side and equals ``randomized_range(A, rank, side="right").mT`` up to rounding.
    """
    A = _matrix(A, "A")
    *batch, m, n = A.shape
    rank = _rank(rank, m, n)
    oversample, power_iters, seed64 = _common(oversample, power_iters, seed)
    A3 = A.reshape(-1, m, n)
    streams = _batch_streams(first_stream, A3.shape[0])
    U, S, Vh = _ops.randomized_svd(A3, rank, oversample, power_iters, seed64, streams)
    return U.view(*batch, m, rank), S.view(*batch, rank), Vh.view(*batch, rank, n)


def randomized_range(
    A: torch.Tensor,
    rank: int,
    *,
    side: Side = "left",
    oversample: int = 8,
    power_iters: int = 1,
    seed: int = 0,
    first_stream: int = 0,
) -> torch.Tensor:
    """Orthonormal basis of the dominant rank-``rank`` subspace of every matrix of ``A`` (..., m, n).

    ``side="right"``: (..., n, rank), the top right singular vectors (the Vh^T of
    :func:`randomized_svd`, up to rounding), from the sketch A Omega (Omega n x k).
    ``side="left"``: (..., m, rank), the top left singular vectors: the right basis of A^T (its
    Omega is m x k). ``"auto"``: right when m >= n, else left (GaLore's rule). float32; batch
    member b uses stream ``first_stream + b``. This is what a projected optimizer stores
    (R = Q^T G or G Q).
    """
    A = _matrix(A, "A")
    *batch, m, n = A.shape
    rank = _rank(rank, m, n)
    side = _side(side, m, n)
    oversample, power_iters, seed64 = _common(oversample, power_iters, seed)
    A3 = A.reshape(-1, m, n)
    streams = _batch_streams(first_stream, A3.shape[0])
    view = A3 if side == "right" else A3.mT  # the op returns the right basis of what it is given
    Q = _ops.randomized_range(view, rank, oversample, power_iters, seed64, streams)
    return Q.view(*batch, view.shape[2], rank)


def _per_matrix(value: object, count: int, name: str) -> list:
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = list(value)
        if len(values) != count:
            raise ValueError(f"{name}: expected one value or {count} values (one per matrix), got {len(values)}")
        return values
    return [value] * count


def _list_matrices(matrices, ranks) -> tuple[list[torch.Tensor], list[int]]:
    if isinstance(matrices, torch.Tensor) or not isinstance(matrices, Sequence):
        raise TypeError(f"matrices: expected a list of tensors, got {type(matrices).__name__}")
    mats = [_matrix(A, f"matrices[{i}]", exact_dims=2) for i, A in enumerate(matrices)]
    for i, A in enumerate(mats[1:], start=1):
        if A.device != mats[0].device:
            raise ValueError(f"matrices[{i}]: on {A.device}, but matrices[0] is on {mats[0].device}")
    rank_list = [
        _rank(r, *A.shape, name=f"ranks[{i}]")
        for i, (A, r) in enumerate(zip(mats, _per_matrix(ranks, len(mats), "ranks")))
    ]
    return mats, rank_list


def _list_options(oversample, power_iters, seed, first_stream, streams, max_batch, count) -> tuple:
    oversample, power_iters, seed64 = _common(oversample, power_iters, seed)
    all_streams = _checks.stream_list(streams, first_stream, count)
    _checks.check_streams(all_streams, count)
    if max_batch is not None:
        _checks.int_at_least(max_batch, "max_batch", 1)
    return oversample, power_iters, seed64, all_streams


def randomized_range_list(
    matrices: Sequence[torch.Tensor],
    ranks: int | Sequence[int],
    *,
    sides: Side | Sequence[Side] = "left",
    oversample: int = 8,
    power_iters: int = 1,
    seed: int = 0,
    first_stream: int = 0,
    streams: Sequence[int] | None = None,
    max_batch: int | None = None,
) -> list[torch.Tensor]:
    """:func:`randomized_range` of every matrix of a list of mixed shapes; results in input order.

    ``matrices[i]`` (2-D, m_i x n_i, all on one device) gets ``ranks[i]`` and ``sides[i]`` (or the
    one value given) and the sketch stream ``s_i = streams[i]`` (default ``first_stream + i``). The
    matrices are grouped by (shape, dtype, side, rank) and each group runs as one batched call of
    at most ``max_batch`` matrices (None: no limit; a smaller batch bounds the float32 copy of the
    group). Because each matrix has its own stream, the result for ``matrices[i]`` equals
    ``randomized_range(matrices[i], ranks[i], side=sides[i], first_stream=s_i, ...)`` whatever else
    is in the list and however it is grouped. This is the one call a LORENZA
    optimizer makes to refresh every layer's subspace.
    """
    mats, rank_list = _list_matrices(matrices, ranks)
    side_list = [
        _side(s, *A.shape, name=f"sides[{i}]")
        for i, (A, s) in enumerate(zip(mats, _per_matrix(sides, len(mats), "sides")))
    ]
    oversample, power_iters, seed64, all_streams = _list_options(
        oversample, power_iters, seed, first_stream, streams, max_batch, len(mats)
    )
    views = [A if side == "right" else A.mT for A, side in zip(mats, side_list)]
    # the op returns the right basis of what it is given: A's for "right", A^T's (= A's left) for "left"
    return _grouped(views, rank_list, all_streams, max_batch, lambda B, r, st: list(
        _ops.randomized_range(B, r, oversample, power_iters, seed64, st).unbind(0)
    ))  # fmt: skip


def _grouped(views, ranks, streams, max_batch, run) -> list:
    """``run(batch, rank, streams)`` per group of same (shape, dtype, rank) views, at most
    ``max_batch`` at a time; results (one per member) back in input order."""
    groups: dict[tuple, list[int]] = {}
    for i, A in enumerate(views):
        groups.setdefault((tuple(A.shape), A.dtype, ranks[i]), []).append(i)
    out: list = [None] * len(views)
    for (shape, _, rank), positions in groups.items():
        step = max_batch or len(positions)
        for s in range(0, len(positions), step):
            chunk = positions[s : s + step]
            if len(chunk) == 1:
                batch = views[chunk[0]].unsqueeze(0)  # a view: no copy for a lone matrix
            else:
                # one copy, straight to float32 (the op would upcast a stacked bf16 copy again)
                batch = torch.empty((len(chunk), *shape), dtype=torch.float32, device=views[0].device)
                for j, i in enumerate(chunk):
                    batch[j].copy_(views[i])
            try:
                results = run(batch, rank, [streams[i] for i in chunk])
            except NonFiniteError as err:  # name the matrix as the caller knows it
                raise ValueError(f"matrices[{chunk[err.member]}]: contains NaN or Inf") from None
            for j, i in enumerate(chunk):
                out[i] = results[j]
    return out


def randomized_svd_list(
    matrices: Sequence[torch.Tensor],
    ranks: int | Sequence[int],
    *,
    oversample: int = 8,
    power_iters: int = 1,
    seed: int = 0,
    first_stream: int = 0,
    streams: Sequence[int] | None = None,
    max_batch: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`randomized_svd` of every matrix of a list of mixed shapes: ``[(U, S, Vh), ...]`` in input order.

    ``matrices[i]`` (2-D, any strides: pass ``A.mT`` to have the accurate side on the left) gets
    ``ranks[i]`` and the sketch stream ``streams[i]`` (default ``first_stream + i``); grouped and
    batched as :func:`randomized_range_list`, so the result for a matrix does not depend on the
    list around it. ``Vh`` is the more accurate side (half a power iteration ahead of ``U``); both
    have orthonormal rows/columns; float32.
    """
    mats, rank_list = _list_matrices(matrices, ranks)
    oversample, power_iters, seed64, all_streams = _list_options(
        oversample, power_iters, seed, first_stream, streams, max_batch, len(mats)
    )

    def run(batch, rank, st):
        U, S, Vh = _ops.randomized_svd(batch, rank, oversample, power_iters, seed64, st)
        return list(zip(U.unbind(0), S.unbind(0), Vh.unbind(0)))

    return _grouped(mats, rank_list, all_streams, max_batch, run)
