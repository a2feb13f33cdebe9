"""Element offsets (``offsets=``): a shard of a larger tensor gets the noise, the rounding words and
the column sums the whole tensor has there, on every backend, against the reference.

A row-sharded ``m x n`` matrix (FSDP2's ``Shard(0)``) is a contiguous range of the flat index, so
the pieces below are cut at arbitrary flat positions (inside Philox blocks, uneven, empty) and at
row boundaries (where the rank-one term and the column sums of a piece must equal the whole's).
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import AXPBY_TOL, BACKENDS, dtype_id, require_backend

import lorenza_kernels as lk
from lorenza_kernels import _ext
from lorenza_kernels.reference.rng import gaussian_range

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, cols) of the whole matrix and the row counts of its shards (ceil(rows / world) chunks
# for 2 and 3 ranks, an empty last shard, one row per shard)
ROW_SPLITS = [((7, 5), [4, 3]), ((7, 5), [3, 3, 1]), ((2, 9), [1, 1, 0]), ((5, 123), [2, 2, 1]), ((1, 11), [1])]


def _cuts(n: int, pieces: int, rng: random.Random) -> list[tuple[int, int]]:
    cuts = sorted({0, n, *(rng.randrange(n + 1) for _ in range(pieces - 1))})
    return list(zip(cuts, cuts[1:])) + [(n, n)]  # and an empty shard at the end


def _rows_to_ranges(rows: list[int], n: int) -> list[tuple[int, int]]:
    out, r = [], 0
    for k in rows:
        out.append((r * n, (r + k) * n))
        r += k
    return out


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("rounding", [False, True], ids=["rne", "sr"])
def test_axpby_shards_equal_the_whole(backend, dev, dtype, rounding):
    require_backend("seeded_axpby_", backend, dev)
    rng = random.Random()
    seed, rseed, stream = rng.getrandbits(64), rng.getrandbits(64), rng.randrange(1 << 32)
    rs = rseed if rounding else None
    for (m, n), rows in ROW_SPLITS:
        whole0 = torch.randn(m, n).to(dev, dtype)
        row = torch.randn(n, device=dev)
        want = whole0.clone()
        with lk.use_backend("reference"):
            want_norm = lk.seeded_axpby_([want], seed, 0.3, 0.9, streams=[stream], row_vectors=[row], gamma=-0.7,
                                         rounding_seed=rs)  # fmt: skip
        # row shards: the rank-one term follows each shard's own columns, which are the whole's
        ranges = _rows_to_ranges(rows, n)
        shards = [whole0.view(-1)[a:b].view(-1, n).clone() for a, b in ranges]
        with lk.use_backend(backend):
            norms = lk.seeded_axpby_(shards, seed, 0.3, 0.9, streams=[stream] * len(shards),
                                     row_vectors=[row] * len(shards), gamma=-0.7, rounding_seed=rs,
                                     offsets=[a for a, _ in ranges])  # fmt: skip
        atol, rtol = AXPBY_TOL[dtype]
        torch.testing.assert_close(torch.cat([s.reshape(-1) for s in shards]).cpu(), want.view(-1).cpu(), atol=atol,
                                   rtol=rtol, msg=f"{(m, n)} {rows} seed={seed}")  # fmt: skip
        torch.testing.assert_close(norms.sum().cpu(), want_norm.sum().cpu(), atol=1e-3, rtol=1e-5)
        # flat pieces at any position (a 1-D shard, inside Philox blocks): noise and rounding words only
        flat = whole0.view(-1)
        want1 = flat.clone()
        with lk.use_backend("reference"):
            lk.seeded_axpby_([want1], seed, 1.5, 1.0, streams=[stream], rounding_seed=rs)
        pieces = _cuts(flat.numel(), 4, rng)
        parts = [flat[a:b].clone() for a, b in pieces]
        with lk.use_backend(backend):
            lk.seeded_axpby_(parts, seed, 1.5, 1.0, streams=[stream] * len(parts), rounding_seed=rs,
                             offsets=[a for a, _ in pieces])  # fmt: skip
        torch.testing.assert_close(torch.cat(parts).cpu(), want1.cpu(), atol=atol, rtol=rtol, msg=f"{pieces}")


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_colsum_and_loren_stats_of_shards_sum_to_the_whole(backend, dev):
    require_backend("seeded_colsum", backend, dev)
    rng = random.Random()
    seed, stream = rng.getrandbits(64), rng.randrange(1 << 32)
    for (m, n), rows in ROW_SPLITS + [((300, 17), [100, 100, 100]), ((9, 8), [3, 3, 3])]:
        whole = torch.empty(m, n, device=dev)
        a = torch.randn(n, device=dev)
        with lk.use_backend("reference"):
            p_want, (c_want,) = lk.seeded_loren_stats([whole], seed, [a], streams=[stream])
        ranges = _rows_to_ranges(rows, n)
        shards = [torch.empty(b // n - a_ // n, n, device=dev) for a_, b in ranges]
        with lk.use_backend(backend):
            p, cols = lk.seeded_loren_stats(shards, seed, [a] * len(shards), streams=[stream] * len(shards),
                                            offsets=[a_ for a_, _ in ranges])  # fmt: skip
        torch.testing.assert_close(sum(cols).cpu(), c_want.cpu(), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(p.sum().cpu(), p_want.sum().cpu(), atol=1e-3, rtol=1e-5)
    # a 1-D shard's column sums are its own noise (one row): the whole's columns at its offset
    v = torch.empty(5, device=dev)
    with lk.use_backend(backend):
        (c,) = lk.seeded_colsum([v], seed, streams=[stream], offsets=[7])
    torch.testing.assert_close(c.cpu(), gaussian_range(7, 12, seed, stream), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
def test_stochastic_round_shards_are_bitwise_the_whole(backend, dev, dtype):
    require_backend("stochastic_round_", backend, dev)
    rng = random.Random()
    seed, stream = rng.getrandbits(64), rng.randrange(1 << 32)
    src = (torch.randn(1000) * 1e-2).to(dev)
    want = torch.empty(1000, dtype=dtype, device=dev)
    with lk.use_backend("reference"):
        lk.stochastic_round_([want], [src], seed, streams=[stream])
    pieces = _cuts(1000, 6, rng)
    parts = [torch.empty(b - a, dtype=dtype, device=dev) for a, b in pieces]
    with lk.use_backend(backend):
        lk.stochastic_round_(parts, [src[a:b].contiguous() for a, b in pieces], seed,
                             streams=[stream] * len(parts), offsets=[a for a, _ in pieces])  # fmt: skip
    assert torch.equal(torch.cat(parts), want), pieces


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("side", ["left", "right"])
def test_projected_adam_rounding_offsets(backend, dev, side):
    """A row shard of W updated with its rounding offset rounds with the whole matrix's words there."""
    require_backend("projected_adam_step_", backend, dev)
    m, n, r = 12, 10, 3
    gen = torch.Generator().manual_seed(random.randrange(1 << 30))
    W = (torch.randn(m, n, generator=gen) * 0.05).to(dev, torch.bfloat16)
    G = torch.randn(m, n, generator=gen).to(dev)
    Q = torch.linalg.qr(torch.randn(m if side == "left" else n, r, generator=gen))[0].to(dev)
    mshape = (r, n) if side == "left" else (m, r)
    kw = dict(step=1, lr=1e-3, scale=0.25, side=side, rounding_seed=99)
    whole = W.clone()
    with lk.use_backend("reference"):
        lk.projected_adam_step_(whole, G, Q, torch.zeros(mshape, device=dev), torch.zeros(mshape, device=dev),
                                rounding_stream=5, **kw)  # fmt: skip
    if side == "right":  # R = G Q is row-local: a row shard takes the whole's update exactly
        lo, hi = 5, 12
        part = W[lo:hi].clone()
        with lk.use_backend(backend):
            lk.projected_adam_step_(part, G[lo:hi], Q, torch.zeros(hi - lo, r, device=dev),
                                    torch.zeros(hi - lo, r, device=dev), rounding_stream=5, rounding_offset=lo * n,
                                    **kw)  # fmt: skip
        diff = (part.float() - whole[lo:hi].float()).abs()
        # the same float32 value gets the same word; one ulp where the backends' float32 values differ
        assert (diff > 0).float().mean() < 0.05 and diff.max() <= 2e-3, diff.max()
    with lk.use_backend(backend):  # offset 0 is the default
        again = W.clone()
        lk.projected_adam_step_(again, G, Q, torch.zeros(mshape, device=dev), torch.zeros(mshape, device=dev),
                                rounding_stream=5, rounding_offset=0, **kw)  # fmt: skip
        base = W.clone()
        lk.projected_adam_step_(base, G, Q, torch.zeros(mshape, device=dev), torch.zeros(mshape, device=dev),
                                rounding_stream=5, **kw)  # fmt: skip
    assert torch.equal(again, base)


def test_gaussian_offset():
    g = lk.gaussian(40, 3, 7)
    for o in (0, 1, 5, 17):
        assert torch.equal(lk.gaussian((3, 4), 3, 7, offset=o).view(-1), g[o : o + 12])


def test_offsets_meta_opcheck_and_errors():
    t = [torch.randn(3, 5), torch.randn(7, dtype=torch.bfloat16)]
    axpby = torch.ops.lorenza_kernels.seeded_axpby_.default
    torch.library.opcheck(axpby, (t, 5, [3, 4], [0.5, 1.0], [1.0, 0.0], None, None, None, [10, 3]))
    torch.library.opcheck(torch.ops.lorenza_kernels.seeded_colsum.default, (t, 7, [1, 0], [5, 0]))
    meta = torch.empty(4, 6, device="meta")
    assert lk.seeded_axpby_([meta], 1, 0.5, offsets=[24]).device.type == "meta"
    assert lk.seeded_colsum([meta], 3, offsets=[6])[0].shape == (6,)
    before = [x.clone() for x in t]
    for bad, match in (([1], "offsets"), ([-1, 0], "offsets\\[0\\]"), ([0, (1 << 62)], "offsets\\[1\\]")):
        with pytest.raises(ValueError, match=match):
            lk.seeded_axpby_(t, 1, 0.5, offsets=bad)
    with pytest.raises(TypeError, match="offsets"):
        lk.seeded_axpby_(t, 1, 0.5, offsets=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="offsets"):
        lk.seeded_colsum(t, 1, offsets=[0])
    with pytest.raises(ValueError, match="offsets"):
        lk.stochastic_round_([t[1]], [torch.zeros(7)], 1, offsets=[-3])
    with pytest.raises(ValueError, match="rounding_offsets"):
        torch.ops.lorenza_kernels.projected_adam_step_(
            [torch.zeros(4, 3)], [torch.zeros(4, 3)], [torch.eye(3)[:, :1].contiguous()], [torch.zeros(4, 1)],
            [torch.zeros(4, 1)], [1], 1e-3, 0.9, 0.999, 1e-8, 0.0, 1.0, "right", 0.0, None, None, [0],
        )  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(t, before))


@pytest.mark.skipif(not _ext.has_cpu_kernels(), reason="CPU kernels not built")
def test_cpu_axpby_offsets_every_isa_and_chunk():
    """The C++ kernel at offsets inside a tile and across its 2^16-element tasks, every ISA: bitwise
    the kernel's own result on the whole tensor (the noise of an index does not depend on where a
    tile starts)."""
    C = _ext._C
    n = 3 * (1 << 16) + 77
    for isa in C.cpu_isas():
        C.set_cpu_isa(isa)
        try:
            for dtype in DTYPES:
                x = torch.randn(n).to(dtype)
                whole = x.clone()
                with lk.use_backend("cpu"):
                    lk.seeded_axpby_([whole], 11, 0.5, 1.0, streams=[3], rounding_seed=8)
                cuts = sorted({0, n, 1, 5, 63, 65, (1 << 16) + 2, 2 * (1 << 16) - 3, n - 1})
                pieces = list(zip(cuts, cuts[1:]))
                parts = [x[a:b].clone() for a, b in pieces]
                with lk.use_backend("cpu"):
                    lk.seeded_axpby_(parts, 11, 0.5, 1.0, streams=[3] * len(parts), rounding_seed=8,
                                     offsets=[a for a, _ in pieces])  # fmt: skip
                assert torch.equal(torch.cat(parts), whole), (isa, dtype)
        finally:
            C.set_cpu_isa("auto")
