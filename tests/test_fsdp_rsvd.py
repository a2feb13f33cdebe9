"""The sharded randomized range finder (``lorenza/optim/_sharded_rsvd.py``) on 2 and 3 gloo ranks:
from row shards only, the basis ``lorenza_kernels.randomized_range`` gives for the whole matrix
(same seed, stream, oversampling and power iterations), to float32 rounding; uneven and empty
shards, both sides, and the Householder fallback (a zero matrix). Also the column collectives of
``_sharding`` (reduce-scatter and all-gather of ``r x n`` factors) against direct sums."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _optim_common import run_on_gloo_ranks, single_thread  # noqa: F401

import lorenza_kernels as lk

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="gloo backend not available"),
]

SEED = (1 << 63) + 7  # a seed of 64 bits, as probe_seed makes them

# (m, n, rank, oversample, power_iters, side)
CASES = [
    (40, 12, 3, 2, 1, "right"),
    (41, 9, 4, 8, 2, "right"),
    (12, 40, 3, 2, 1, "left"),
    (7, 30, 2, 1, 0, "left"),
    (2, 9, 2, 0, 1, "left"),  # 3 ranks: rows 1, 1, 0
    (9, 2, 1, 0, 1, "right"),
    (20, 6, 2, 1, 1, "zero"),  # Cholesky fails: the Householder fallback
]


def _matrix(m: int, n: int, case: int) -> torch.Tensor:
    """A matrix with a decaying spectrum (well separated singular values)."""
    g = torch.Generator().manual_seed(100 + case)
    u = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))[0]
    s = 2.0 ** -torch.arange(min(m, n), dtype=torch.float64)
    return ((u * s) @ v.T).float()


def _rows(m: int, world: int, rank: int) -> tuple[int, int]:
    chunk = -(-m // world)
    r0 = min(rank * chunk, m)
    return r0, min(r0 + chunk, m)


def _rank_run(rank: int, world: int) -> dict:
    from lorenza.optim._sharded_rsvd import sharded_randomized_range
    from lorenza.optim._sharding import all_gather_cols, reduce_scatter_cols

    out = {}
    for c, (m, n, r, over, q, side) in enumerate(CASES):
        A = torch.zeros(m, n) if side == "zero" else _matrix(m, n, c)
        r0, r1 = _rows(m, world, rank)
        for factors in (False, True):
            out[c, factors] = sharded_randomized_range(
                A[r0:r1], m, r0, r, side="right" if side == "zero" else side, oversample=over, power_iters=q,
                seed=SEED, stream=3 + c, factors=factors,
            )  # fmt: skip
    # partial r x n factors (each rank's), reduce-scattered by columns, then gathered back
    mats = [torch.full((3, n), float(rank + 1)) * torch.arange(n) for n in (5, 8, 2)]
    cols = reduce_scatter_cols(mats, None)
    out["cols"] = cols, all_gather_cols(cols, [5, 8, 2], None)
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_range_equals_the_whole_matrix_range(world, tmp_path):
    ranks = run_on_gloo_ranks(_rank_run, world, tmp_path)
    for c, (m, n, r, over, q, side) in enumerate(CASES):
        A = torch.zeros(m, n) if side == "zero" else _matrix(m, n, c)
        whole_side = "right" if side == "zero" else side
        ref = lk.randomized_range(A, r, side=whole_side, oversample=over, power_iters=q, seed=SEED, first_stream=3 + c)
        # with factors: randomized_svd of A (right) or A^T (left), as _subspace.refresh_bases uses it
        U, _, Vh = lk.randomized_svd(A if whole_side == "right" else A.T, r, oversample=over, power_iters=q,
                                     seed=SEED, first_stream=3 + c)  # fmt: skip
        if whole_side == "right":  # the basis whole on every rank; U's rows
            for res in ranks:
                torch.testing.assert_close(res[c, False], ref, atol=2e-5, rtol=1e-4, msg=str(CASES[c]))
                torch.testing.assert_close(res[c, True][0], Vh.T, atol=2e-5, rtol=1e-4, msg=str(CASES[c]))
            got = torch.cat([res[c, True][1] for res in ranks])
            torch.testing.assert_close(got, U, atol=2e-5, rtol=1e-4, msg=str(CASES[c]))
        else:  # the basis's rows; the other factor whole
            got = torch.cat([res[c, False] for res in ranks])
            torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4, msg=str(CASES[c]))
            got = torch.cat([res[c, True][0] for res in ranks])
            torch.testing.assert_close(got, Vh.T, atol=2e-5, rtol=1e-4, msg=str(CASES[c]))
            for res in ranks:
                torch.testing.assert_close(res[c, True][1], U, atol=2e-5, rtol=1e-4, msg=str(CASES[c]))
        if side != "zero":  # orthonormal
            basis = ranks[0][c, False] if whole_side == "right" else torch.cat([res[c, False] for res in ranks])
            torch.testing.assert_close(basis.T @ basis, torch.eye(r), atol=1e-5, rtol=0)
    total = sum(k + 1 for k in range(world))  # the partial factors summed over the ranks
    for k, res in enumerate(ranks):
        cols, back = res["cols"]
        for n, part, full in zip((5, 8, 2), cols, back):
            chunk = -(-n // world)
            c0, c1 = min(k * chunk, n), min((k + 1) * chunk, n)
            whole = torch.full((3, n), float(total)) * torch.arange(n)
            torch.testing.assert_close(part, whole[:, c0:c1])
            torch.testing.assert_close(full, whole)
