"""Randomized range finder of a row-sharded matrix: never gathers the matrix (FSDP2's gradients).

The building block for the low-rank optimizers under FSDP2 (``docs/algorithms.md``, "Distributed
training"): rank ``w`` holds rows ``[row0, row0 + m_w)`` of an ``m x n`` float32 matrix ``A`` (a
gradient sharded by ``fully_shard``), and :func:`sharded_randomized_range` returns the basis that
``lorenza_kernels.randomized_range`` returns for the whole ``A`` (same sketch, same seed and
stream, same CholeskyQR2 passes and sign convention: ``lorenza_kernels/reference/rsvd.py``), to
float rounding. What crosses the ranks is small:

* a product with a row-sharded operand on its left, ``A^T X = sum_w A_w^T X_w`` (``n x k``), is one
  all-reduce; ``A X`` with ``X`` whole is local (rows stay where they are);
* CholeskyQR of a row-sharded ``X`` (``N x k``) needs only the Gram matrix ``X^T X = sum_w X_w^T X_w``
  (one ``k x k`` all-reduce per pass); ``Q_w = X_w R^-1`` is local. The rare Householder fallback
  (Cholesky failed: a rank-deficient sketch) gathers that ``N x k`` matrix, never ``A``.

``side="right"`` (``m >= n``, GaLore's rule): the basis is ``n x rank``, whole on every rank, from
the sketch ``Y = A Omega`` (local rows). ``side="left"``: the basis is ``m x rank``, returned as this
rank's rows, from the sketch of ``A^T`` (``Omega`` is ``m x k``: its rows ``[row0, row0 + m_w)``).
Traffic per call, ``k = min(rank + oversample, m, n)``, ``q`` power iterations: right, ``q + 1``
all-reduces of ``n x k`` and ``2 (q + 1)`` (or 3) of ``k x k``; left, ``q + 1`` of ``n x k`` and
``2 (q + 1)`` of ``k x k``, plus one all-gather of ``3 k`` numbers (the sign pivots). Gathering the
gradient instead moves ``m n`` numbers to every rank and repeats the SVD on each.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist

from lorenza_kernels import _checks, _ops
from lorenza_kernels.reference import rsvd as _ref

from . import _sharding

__all__ = ["sharded_randomized_range"]


def _all_reduce(t: torch.Tensor, group: Any) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _cholqr_pass(X: torch.Tensor, N: int, shift: bool, group: Any):
    """One Cholesky QR pass of the row-sharded ``X`` (``N`` rows in all): ``(Q_w, R, ok)``, ``R``
    and ``ok`` the same on every rank (they come from the all-reduced Gram matrix)."""
    k = X.shape[-1]
    G = _all_reduce(X.mT @ X, group)
    if shift:  # the reference's relative diagonal shift (reference/rsvd.py, _cholqr_pass)
        G = G + torch.diag(G.diagonal() * (max(k, math.sqrt(N)) * _ref._U32))
    R, info = torch.linalg.cholesky_ex(G, upper=True)
    eye = torch.eye(k, dtype=X.dtype, device=X.device)
    if int(info) != 0:
        return X, eye, False
    return X @ torch.linalg.solve_triangular(R, eye, upper=True), R, True


def _gather_rows(X: torch.Tensor, N: int, group: Any) -> torch.Tensor:
    """The whole ``N x k`` matrix of the row shards ``X`` (ceil chunks): one all-gather."""
    return _sharding.all_gather_rows([X], [N], group)[0]


def _orthonormalize_rows(X: torch.Tensor, N: int, row0: int, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``X = Q R`` for a row-sharded ``X``: the reference's CholeskyQR2 (a third pass when the second
    factor's diagonal ratio exceeds its limit, Householder on the gathered ``X`` when Cholesky fails
    or the result is not finite). Returns this rank's rows of ``Q`` and the whole ``R``."""
    Q, R1, ok = _cholqr_pass(X, N, True, group)
    if ok:
        Q, R2, ok = _cholqr_pass(Q, N, False, group)
        R = R2 @ R1
        if ok and float(_ref._diag_ratio(R2[None])[0]) > _ref._DIAG_RATIO_LIMIT:
            Q, R3, ok = _cholqr_pass(Q, N, False, group)
            R = R3 @ R
            ok = ok and float(_ref._diag_ratio(R3[None])[0]) <= _ref._DIAG_RATIO_LIMIT
    if ok:  # the finiteness verdict is every rank's
        bad = torch.tensor([0.0 if bool(torch.isfinite(Q).all()) else 1.0], device=X.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX, group=group)
        ok = not bool(bad.item())
    if not ok:
        Qh, R = torch.linalg.qr(_gather_rows(X, N, group))
        Q = Qh[row0 : row0 + X.shape[0]].contiguous()
    return Q, R


def _orthonormalize(X: torch.Tensor) -> torch.Tensor:
    """``Q`` of a whole ``X`` (the same on every rank): the reference itself."""
    return _ref.orthonormalize(X[None])[0][0]


def _fix_signs_rows(U: torch.Tensor, row0: int, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's sign convention (each column's entry of largest magnitude positive; the
    first such entry on ties) for a row-sharded ``U``: one all-gather of ``3 k`` numbers per rank."""
    k = U.shape[-1]
    if U.shape[0]:
        mag, idx = U.abs().max(dim=0)
        val = U.gather(0, idx[None])[0]
        mine = torch.stack([mag.double(), (idx + row0).double(), val.double()], 1)
    else:  # an empty shard never holds the pivot
        mine = torch.tensor([[-1.0, 0.0, 0.0]], dtype=torch.float64, device=U.device).expand(k, 3)
    world = dist.get_world_size(group)
    every = torch.empty(world * k * 3, dtype=torch.float64, device=U.device)
    _sharding._all_gather_single(every, mine.contiguous().reshape(-1), group=group)
    every = every.view(world, k, 3)
    mag, row, val = every[..., 0], every[..., 1], every[..., 2]
    top = mag.amax(0, keepdim=True)
    row = torch.where(mag == top, row, torch.full_like(row, math.inf))  # the first row on ties
    pick = row.argmin(0)
    signs = torch.sign(val.gather(0, pick[None])[0]).to(U.dtype)
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, signs


def sharded_randomized_range(
    A: torch.Tensor,
    m: int,
    row0: int,
    rank: int,
    *,
    side: str,
    oversample: int = 8,
    power_iters: int = 1,
    seed: int = 0,
    stream: int = 0,
    group: Any = None,
    factors: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The basis ``lorenza_kernels.randomized_range(A_whole, rank, side=side, ...)`` from this rank's
    rows ``A`` (``m_w x n``, rows ``[row0, row0 + m_w)`` of the ``m x n`` whole) without gathering
    ``A``: ``side="right"``, the ``n x rank`` basis (whole); ``"left"``, this rank's ``m_w x rank``
    rows of the ``m x rank`` basis. Every rank of ``group`` must call it with the same arguments
    (but its own rows). float32.

    ``factors=True``: ``(basis, factor)`` as ``_subspace.refresh_bases(..., factors=True)`` makes
    them from ``lorenza_kernels.randomized_svd`` of ``A`` (right) or ``A^T`` (left): the basis is
    the more accurate side's singular vectors, the factor the other side's (right: this rank's
    ``m_w x rank`` rows of ``U``; left: ``V``, ``n x rank``, whole)."""
    if side not in ("left", "right"):
        raise ValueError(f"side: expected 'left' or 'right', got {side!r}")
    A = A.detach().to(torch.float32)
    n = A.shape[1]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank: must be in [1, min(m, n) = {min(m, n)}] for a {m} x {n} matrix, got {rank}")
    seed = _checks.seed_to_int64(seed)  # the ops' encoding (0 <= seed < 2^64 checked)
    if side == "right":  # reference/rsvd.py: factor(A) then randomized_range
        k = _ref.sketch_width(rank, oversample, m, n)
        Y = _ops.rsvd_sketch(A[None], k, seed, [stream])[0]  # A_w Omega: this rank's rows of Y
        Q, _ = _orthonormalize_rows(Y, m, row0, group)
        for _ in range(power_iters):
            Z = _orthonormalize(_all_reduce(A.mT @ Q, group))
            Q, _ = _orthonormalize_rows(A @ Z, m, row0, group)
        P, R = _ref.orthonormalize(_all_reduce(A.mT @ Q, group)[None])
        if factors:  # reference randomized_svd: A ~ Q R^T P^T = (Q U_r) S (P V_r)^T
            Ur, _, Vrh = torch.linalg.svd(R[0].mT)
            V, signs = _ref._fix_signs(P[0] @ Vrh[:rank].mT)
            return V, (Q @ Ur[:, :rank]) * signs
        return _ref._fix_signs(torch.bmm(P, _ref._gram_eigvecs(R.mT)[..., :rank]))[0][0]
    # left: the right basis of B = A^T (n x m, its columns sharded), sketched by Omega (m x k)
    k = _ref.sketch_width(rank, oversample, n, m)
    omega = _ref.sketch_matrix_t([stream], k, m, seed, A.device)[0].mT  # m x k, whole
    Q = _orthonormalize(_all_reduce(A.mT @ omega[row0 : row0 + A.shape[0]], group))  # orth(B Omega)
    for _ in range(power_iters):
        Z, _ = _orthonormalize_rows(A @ Q, m, row0, group)  # orth(B^T Q), rows sharded
        Q = _orthonormalize(_all_reduce(A.mT @ Z, group))  # orth(B Z)
    P, R = _orthonormalize_rows(A @ Q, m, row0, group)  # B^T Q = P R, rows sharded
    if factors:  # the SVD of B = A^T: B ~ Q R^T P^T = (Q U_r) S (P V_r)^T; the basis is P V_r
        Ur, _, Vrh = torch.linalg.svd(R.mT)
        V, signs = _fix_signs_rows(P @ Vrh[:rank].mT, row0, group)
        return V, (Q @ Ur[:, :rank]) * signs
    return _fix_signs_rows(P @ _ref._gram_eigvecs(R.mT[None])[0][:, :rank], row0, group)[0]
