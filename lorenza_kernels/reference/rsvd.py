"""Reference batched randomized SVD (docs/kernels.md section 3): the meaning every backend must match.

Halko, Martinsson, Tropp, "Finding structure with randomness" (SIAM Review 2011),
https://arxiv.org/abs/0909.4061, Algorithm 4.4 (randomized subspace iteration) + Algorithm 5.1:

    Y = A Omega;  Q = orth(Y);  q times: Q = orth(A orth(A^T Q));  B = Q^T A;  B = U_B S V^T;  U = Q U_B

for every member of a batch A (B, m, n), in float32, with the sketch width k = min(r + p, m, n).
B^T = A^T Q is orthonormalised too (:func:`factor`): the op ``randomized_range`` returns the basis
of the side that was *not* sketched (the right one), which is half a power iteration more accurate.

Sketch convention (lorenza-philox-v1, ``docs/rng.md``): batch member b with stream s_b uses
``Omega_b = gaussian((k, n), seed, s_b).T``, i.e. ``Omega_b[j, c] = z(seed, s_b, c * n + j)``.
Column c of Omega is a contiguous run of the stream, so a wider sketch only appends columns: the
first k columns never depend on the oversampling.

orth() is CholeskyQR2 (Yamamoto, Nakatsukasa, Yanagisawa, Fukaya, "Roundoff error analysis of the
CholeskyQR2 algorithm", ETNA 2015, https://etna.math.kent.edu/vol.44.2015/pp306-326.dir/pp306-326.pdf)
with the first pass shifted as in shifted CholeskyQR (Fukaya, Kannan, Nakatsukasa, Zhang,
Yamamoto, SISC 2020, https://arxiv.org/abs/1809.11085): batched GEMMs, one k x k Cholesky and one
k x k triangular inverse per pass. See :func:`orthonormalize` for the shift and the fallbacks.

Singular vectors are returned with a fixed sign (the entry of largest magnitude of every column of
V is positive; U follows), so that one seed gives one answer on every device up to rounding.
"""

from __future__ import annotations

import math

import torch

from .. import _ops
from .._registry import register
from .rng import CHUNK, MASK32, _box_muller, philox4x32_10, uniform_from_word

#: fp32 unit roundoff.
_U32 = 2.0**-24
#: A Cholesky factor whose diagonal spans more than this ratio means the basis it produced is not
#: yet orthonormal to fp32 accuracy (the loss of orthogonality of Cholesky QR grows like u k(X)^2,
#: and k(X) >= max|r_ii| / min|r_ii|): such members get one more pass.
_DIAG_RATIO_LIMIT = 4.0

# path codes reported by orthonormalize(..., return_path=True)
PATH_HOUSEHOLDER, PATH_CHOLQR2, PATH_CHOLQR3 = 0, 2, 3


def sketch_width(rank: int, oversample: int, m: int, n: int) -> int:
    """k = min(rank + oversample, m, n): a sketch wider than the matrix spans nothing more."""
    return min(rank + oversample, m, n)


def sketch_matrix_t(streams: list[int], k: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """``Omega_b^T`` for every stream, (len(streams), k, n) float32: ``gaussian((k, n), seed, s_b)``.

    All streams are generated together (the stream is a counter word, broadcast against the block
    index), so a batch costs one pass of elementwise ops, not one per member.
    """
    count, total = len(streams), k * n
    nblocks = (total + 3) // 4
    out = torch.empty(count, 4 * nblocks, dtype=torch.float32, device=device)
    if count == 0 or total == 0:
        return out[:, :total].view(count, k, n)
    seed &= (1 << 64) - 1
    key = (seed & MASK32, seed >> 32)
    stream_col = torch.tensor(streams, dtype=torch.int64, device=device)[:, None]
    step = max(1, (CHUNK // 4) // count)  # bounds the int64 temporaries like the reference stream
    for b0 in range(0, nblocks, step):
        b1 = min(b0 + step, nblocks)
        blocks = torch.arange(b0, b1, dtype=torch.int64, device=device)[None, :]
        x = philox4x32_10((blocks & MASK32, blocks >> 32, stream_col, 0), key)
        u = [uniform_from_word(w) for w in x]
        z0, z1 = _box_muller(u[0], u[1])
        z2, z3 = _box_muller(u[2], u[3])
        out[:, 4 * b0 : 4 * b1] = torch.stack((z0, z1, z2, z3), dim=-1).reshape(count, -1)
    return out[:, :total].view(count, k, n)


@register("rsvd_sketch", "reference", "any")
def rsvd_sketch(A: torch.Tensor, k: int, seed: int, streams: list[int]) -> torch.Tensor:
    """Y_b = A_b Omega_b, float32 (B, m, k)."""
    omega_t = sketch_matrix_t(streams, k, A.shape[-1], seed, A.device)
    return torch.bmm(A.to(torch.float32), omega_t.mT)


def _cholqr_pass(X: torch.Tensor, shift: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Cholesky QR pass: X = Q R, R = chol(X^T X [+ shift])^T. Returns (Q, R, ok per member)."""
    N, k = X.shape[-2], X.shape[-1]
    G = torch.bmm(X.mT, X)
    if shift:
        # Shift every diagonal entry relative to itself (a column scaling leaves Cholesky's rounding
        # unchanged, so graded columns, like those of A^T Q, are not penalised) by about the size of
        # the Gram matrix's own rounding error (sqrt(N) u typical), so Cholesky succeeds up to
        # k(X) ~ 1e7 and the later passes restore orthogonality. Fukaya et al.'s worst-case shift
        # (11 (N k + k^2) u ||X||^2) is far too large in fp32.
        c = max(k, math.sqrt(N)) * _U32
        G = G + torch.diag_embed(G.diagonal(dim1=-2, dim2=-1) * c)
    R, info = torch.linalg.cholesky_ex(G, upper=True)
    ok = info == 0
    eye = torch.eye(k, dtype=X.dtype, device=X.device).expand_as(R)
    R = torch.where(ok[:, None, None], R, eye)  # failed members are redone by Householder
    # X R^-1 as an explicit triangular inverse and one GEMM: the same accuracy here (R is well
    # conditioned whenever the result is kept) and about twice as fast as a right-sided trsm.
    Q = torch.bmm(X, torch.linalg.solve_triangular(R, eye, upper=True))
    return Q, R, ok


def _diag_ratio(R: torch.Tensor) -> torch.Tensor:
    d = R.diagonal(dim1=-2, dim2=-1).abs()
    return d.amax(-1) / d.amin(-1)


def orthonormalize(X: torch.Tensor, return_path: bool = False):
    """X = Q R for a batch X (B, N, k), N >= k, float32: Q with orthonormal columns, R upper.

    1. Shifted Cholesky QR (shift ``max(k, sqrt(N)) u`` times each diagonal entry of X^T X).
    2. Plain Cholesky QR of the result: CholeskyQR2. Enough for k(X) up to ~1e4 (fp32).
    3. A third plain pass only for the members whose second factor still has a diagonal ratio
       above ``_DIAG_RATIO_LIMIT`` (k(X) ~ 1e4..1e7).
    4. Householder QR (``torch.linalg.qr``) of the original X for the members whose Cholesky
       failed in any pass (``cholesky_ex`` info != 0: rank deficiency, an all-zero X) or that are
       still not orthonormal after pass 3. Householder always returns orthonormal columns, also for
       a rank-deficient X (then the extra columns are an arbitrary orthonormal completion).

    With ``return_path`` also returns the path taken per member (PATH_* codes).
    """
    Q, R1, ok = _cholqr_pass(X, shift=True)
    Q, R2, ok2 = _cholqr_pass(Q, shift=False)
    ok &= ok2
    R = torch.bmm(R2, R1)
    path = torch.full(ok.shape, PATH_CHOLQR2, dtype=torch.int8, device=X.device)
    third = ok & (_diag_ratio(R2) > _DIAG_RATIO_LIMIT)
    if bool(third.any()):
        idx = third.nonzero().squeeze(1)
        Q3, R3, ok3 = _cholqr_pass(Q[idx], shift=False)
        Q[idx], R[idx] = Q3, torch.bmm(R3, R[idx])
        ok[idx] = ok3 & (_diag_ratio(R3) <= _DIAG_RATIO_LIMIT)
        path[idx] = PATH_CHOLQR3
    bad = ~ok | ~torch.isfinite(Q).flatten(1).all(1)
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        Qh, Rh = torch.linalg.qr(X[idx])
        Q[idx], R[idx] = Qh, Rh
        path[idx] = PATH_HOUSEHOLDER
    return (Q, R, path) if return_path else (Q, R)


def _fix_signs(U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip columns so that each one's entry of largest magnitude is positive; returns (U, signs)."""
    pivot = U.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(U, -2, pivot))
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return U * signs, signs


def range_basis(A32: torch.Tensor, k: int, power_iters: int, seed: int, streams: list[int]) -> torch.Tensor:
    """Q (B, m, k): orthonormal basis of the power-iterated sketch (HMT Algorithm 4.4).

    Every product is re-orthonormalised, otherwise A (A^T A)^q Omega loses all but the leading
    singular directions to rounding. The sketch itself goes through torch's dispatcher, so the
    device's fastest sketch (on CUDA, Triton's: Omega generated inside the GEMM) runs.
    """
    Y = _ops.rsvd_sketch(A32, k, seed, streams)
    Q = orthonormalize(Y)[0]
    for _ in range(power_iters):
        Z = orthonormalize(torch.bmm(A32.mT, Q))[0]
        Q = orthonormalize(torch.bmm(A32, Z))[0]
    return Q


def factor(A32: torch.Tensor, k: int, power_iters: int, seed: int, streams: list[int]):
    """(Q (B, m, k), P (B, n, k), R (B, k, k)) with A ~ Q Q^T A = Q R^T P^T, Q and P orthonormal.

    B^T = A^T Q is factored B^T = P R by the same orthonormalisation, so the SVD of A's
    approximation is that of the k x k matrix R^T = U_R S V_R^T: U = Q U_R, V = P V_R. Only a k x k
    matrix goes to LAPACK/cuSOLVER (a k x n SVD is ~20x slower there) and the singular values stay
    accurate relative to sigma_1 (nothing is squared).

    V lives in span(A^T Q) = span((A^T A)^(q+1) Omega'): half a power iteration ahead of U, at no
    cost. Measured on a 1/i spectrum at r = 128, p = 8, q = 1: ||A - V V^T A||_F exceeds the optimum
    by 2.2 %, ||A - U U^T A||_F by 4.5 %. This is why a basis is always computed on the side that
    was not sketched.
    """
    Q = range_basis(A32, k, power_iters, seed, streams)
    P, R = orthonormalize(torch.bmm(A32.mT, Q))
    return Q, P, R


@register("randomized_range", "reference", "any")
def randomized_range(
    A: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int, streams: list[int]
) -> torch.Tensor:
    """Right basis (B, n, rank) float32: P U_R[:, :rank], the top right singular vectors of Q Q^T A.

    A is sketched from the right (Omega n x k, Y = A Omega spans the left space) and the basis is
    taken on the right side (:func:`factor`). Only the rotation V_R is needed: the eigenvectors of
    R R^T (k x k). Squaring R's condition only blurs directions with sigma_i < sqrt(u) sigma_1,
    whose contribution to ||A - A V V^T|| is below fp32 resolution anyway.
    """
    nb, m, n = A.shape
    if nb == 0:
        return torch.empty(0, n, rank, dtype=torch.float32, device=A.device)
    _, P, R = factor(A.to(torch.float32), sketch_width(rank, oversample, m, n), power_iters, seed, streams)
    return _fix_signs(torch.bmm(P, _gram_eigvecs(R.mT)[..., :rank]))[0]


def _gram_eigvecs(X: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of X^T X (B, k, k), eigenvalues descending (the right singular vectors of X).

    On CUDA, torch.linalg.eigh loops over the batch for k > 32 (one cuSOLVER syevd per matrix,
    https://github.com/pytorch/pytorch/issues/175585), which would cost more than all the GEMMs of a
    refresh; the gesvda driver computes the same eigenvectors (it is the eigendecomposition of the
    Gram matrix) for the whole batch in one cusolverDn<t>gesvdaStridedBatched call. Its left vectors
    are unreliable for tiny singular values, but only the right ones are used here; a member whose
    result is not finite is redone by eigh.
    """
    nb, _, k = X.shape
    if X.device.type == "cuda" and nb > 1 and k > 32:
        V = torch.linalg.svd(X, full_matrices=False, driver="gesvda")[2].mT
        bad = ~torch.isfinite(V).flatten(1).all(1)
        if not bool(bad.any()):
            return V
        idx = bad.nonzero().squeeze(1)
        V[idx] = _gram_eigvecs_eigh(X[idx])
        return V
    return _gram_eigvecs_eigh(X)


def _gram_eigvecs_eigh(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.eigh(torch.bmm(X.mT, X))[1].flip(-1)  # eigh: ascending eigenvalues


@register("randomized_svd", "reference", "any")
def randomized_svd(
    A: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int, streams: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (B, m, rank), S (B, rank), Vh (B, rank, n)), float32; see :func:`factor`.

    The sign convention is set on V (the more accurate side), so that Vh^T equals
    :func:`randomized_range` of the same matrix, seed and stream up to rounding.
    """
    nb, m, n = A.shape
    if nb == 0:

        def empty(*shape: int) -> torch.Tensor:
            return torch.empty(shape, dtype=torch.float32, device=A.device)

        return empty(0, m, rank), empty(0, rank), empty(0, rank, n)
    Q, P, R = factor(A.to(torch.float32), sketch_width(rank, oversample, m, n), power_iters, seed, streams)
    Ur, S, Vrh = torch.linalg.svd(R.mT)  # A ~ Q R^T P^T = (Q U_r) S (P V_r)^T
    V, signs = _fix_signs(torch.bmm(P, Vrh[..., :rank, :].mT))
    U = torch.bmm(Q, Ur[..., :rank]) * signs
    return U, S[..., :rank].contiguous(), V.mT.contiguous()
