"""The CUDA backend's build and Python glue, checked without a GPU.

The kernels' results are tested by the generic op tests (every registered backend against the
reference, on a GPU where there is one). Here: the extension built with CUDA imports on a machine
without a GPU, registers its implementations, exposes a record layout the table builders can
mirror, and the table builders (which read only shapes, dtypes and addresses) plan the work the
way the kernels expect. Nothing here initialises CUDA.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from lorenza_kernels import _ext, _registry

pytestmark = pytest.mark.skipif(
    not _ext.has_cuda_kernels(),
    reason=f"lorenza_kernels._C was not built with CUDA ({_ext.error or 'built without LORENZA_KERNELS_CUDA'})",
)


@pytest.fixture(scope="module")
def so():
    from lorenza_kernels.cuda import seeded_ops

    return seeded_ops


def test_registered_for_cuda(so):
    assert _registry.implementation("seeded_axpby_", "cuda", "cuda") is so.seeded_axpby_
    assert _registry.implementation("seeded_colsum", "cuda", "cuda") is so.seeded_colsum
    assert _registry.implementation("stochastic_round_", "cuda", "cuda") is so.stochastic_round_
    assert _registry.implementation("seeded_axpby_", "cuda", "cpu") is None
    assert "cuda" in _registry.available("seeded_axpby_")["seeded_axpby_"]["cuda"]


def test_import_does_not_initialise_cuda():
    code = (
        "import torch, lorenza_kernels\n"
        "from lorenza_kernels.cuda import seeded_ops\n"
        "seeded_ops.layout()\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("record,size", [("axpby", 80), ("colsum", 80), ("round", 64)])
def test_record_layout(so, record, size):
    dt = getattr(so.layout(), record)
    assert dt.itemsize == size and size % 16 == 0  # whole 16-byte loads (load_record)
    assert "offset" in dt.names  # the element offset of a shard (offsets=)
    spans = sorted((dt.fields[n][1], dt.fields[n][1] + dt.fields[n][0].itemsize) for n in dt.names)
    assert spans[0][0] >= 0 and spans[-1][1] <= size
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), "fields overlap"


def test_axpby_table(so):
    lay = so.layout()
    storage = torch.zeros(10_000, dtype=torch.bfloat16)
    ts = [
        torch.zeros(5, dtype=torch.float32),
        storage[3 : 3 + 37 * 41].view(37, 41),  # a view at an odd element offset
        torch.zeros(0, dtype=torch.float16),
        torch.zeros(2, 3, 4, dtype=torch.float16),
        torch.zeros(lay.chunk_units * 4 + 1, dtype=torch.float32),  # one element past a chunk edge
    ]
    rows = [torch.zeros(so.matrix_dims(t)[1]) for t in ts]
    gamma = [1.0, 0.0, 2.0, 3.0, 4.0]
    streams = [2**32 - 1, 0, 7, 3, 2**31]  # any order: the table carries one stream per tensor
    rec, chunks = so.axpby_table(ts, [0.1] * 5, [1.0, 0.0, 1e-50, -0.0, 2.0], streams, rows, gamma)
    per_unit = [lay.unit_bytes // t.element_size() for t in ts]
    n_chunks = [_cdiv(_cdiv(t.numel(), e), lay.chunk_units) for t, e in zip(ts, per_unit)]
    assert chunks == sum(n_chunks) and n_chunks[-1] == 2
    assert rec["chunk_begin"].tolist() == np.cumsum([0, *n_chunks[:-1]]).tolist()
    assert rec["data"].tolist() == [t.data_ptr() for t in ts]
    assert rec["data"][1] % 16 == 6  # misaligned: the kernel must take the narrow-access path
    assert rec["numel"].tolist() == [t.numel() for t in ts]
    assert rec["ncols"].tolist() == [5, 41, 1, 12, lay.chunk_units * 4 + 1]
    assert rec["stream"].tolist() == streams
    assert rec["dtype"].tolist() == [0, 1, 2, 2, 0]
    assert rec["read_t"].tolist() == [1, 0, 1, 0, 1]  # decided on the float64 beta, as the reference
    assert rec["alpha"][0] == np.float32(0.1)
    assert rec["row"].tolist() == [rows[0].data_ptr(), 0, rows[2].data_ptr(), rows[3].data_ptr(), rows[4].data_ptr()]
    assert rec["offset"].tolist() == [0] * 5  # no offsets: every tensor starts at stream index 0
    offs = [3, 0, 7, 12, 1 << 40]
    assert so.axpby_table(ts, [0.1] * 5, [1.0] * 5, streams, offsets=offs)[0]["offset"].tolist() == offs


def test_round_table(so):
    """One record per (dst, src) pair: addresses, sizes, dtype codes, streams in any order, and chunks
    of 16-byte units of dst (8 elements of a 16-bit dst, 4 of a float32 one)."""
    lay = so.layout()
    storage = torch.zeros(10_000, dtype=torch.float16)
    dst = [
        torch.zeros(5, dtype=torch.bfloat16),
        storage[3 : 3 + 37 * 41].view(37, 41),  # misaligned: the narrow-access path
        torch.zeros(0, dtype=torch.bfloat16),
        torch.zeros(lay.chunk_units * 4 + 1),  # float32: one element past a chunk edge
        torch.zeros(lay.chunk_units * 8, dtype=torch.bfloat16),  # exactly one chunk
    ]
    src = [torch.zeros(d.shape) for d in dst]
    streams = [2**32 - 1, 0, 7, 3, 2**31]
    rec, chunks = so.round_table(dst, src, streams)
    n_chunks = [_cdiv(_cdiv(d.numel(), lay.unit_bytes // d.element_size()), lay.chunk_units) for d in dst]
    assert n_chunks == [1, 1, 0, 2, 1] and chunks == sum(n_chunks)
    assert rec["chunk_begin"].tolist() == np.cumsum([0, *n_chunks[:-1]]).tolist()
    assert rec["dst"].tolist() == [d.data_ptr() for d in dst] and rec["src"].tolist() == [x.data_ptr() for x in src]
    assert rec["dst"][1] % 16 == 6
    assert rec["numel"].tolist() == [d.numel() for d in dst]
    assert rec["stream"].tolist() == streams
    assert rec["dtype"].tolist() == [1, 2, 1, 0, 1]


@pytest.mark.parametrize(
    "shape",
    [(1,), (7,), (3, 1), (5, 123, 3), (4096, 5), (2, 1030), (2, 3000), (3000, 9), (0, 6), (0,), (70_000,)],
)
def test_colsum_plan_covers_every_element_once(so, shape):
    """Replays the kernel's item decomposition: every (row, column) is summed by exactly one thread
    of one item, and each column is written exactly once (to out, or per slab to the workspace)."""
    lay = so.layout()
    t = torch.empty(shape)
    m, n = so.matrix_dims(t)
    out = torch.empty(n)
    rec, items, ws = so.colsum_table([t], [out], [9])
    r = rec[0]
    assert (int(r["m"]), int(r["n"]), int(r["stream"])) == (m, n, 9)
    tc_count, tr_count = 1 << int(r["tc_log2"]), lay.threads >> int(r["tc_log2"])
    rps, col_tiles = int(r["rows_per_slab"]), int(r["col_tiles"])
    assert rps % tr_count == 0 and rps >= tr_count and tc_count <= lay.threads
    assert tr_count <= max(m, 4) or tc_count >= -(-n // 4)  # thread rows idle only if columns run out
    slabs = -(-m // rps) if m else 0
    assert items == col_tiles * slabs and slabs <= lay.colsum_max_slabs
    assert (ws, int(r["ws_begin"])) == ((slabs * n, 0) if slabs > 1 else (0, -1))
    hits = np.zeros((m, n), dtype=np.int64)
    writes = np.zeros((max(slabs, 1), n), dtype=np.int64)
    for item in range(items):
        slab, tile = divmod(item, col_tiles)
        for tid in range(lay.threads):
            tc, tr = tid % tc_count, tid // tc_count
            j0 = (tile * tc_count + tc) * 4
            rows = range(slab * rps + tr, min(m, (slab + 1) * rps), tr_count)
            if j0 < n:
                hits[np.ix_(list(rows), list(range(j0, min(j0 + 4, n))))] += 1
        for o in range(4 * tc_count):  # the kernel's output loop (o = tid, tid + 256, ...)
            col = (tile * tc_count + o // 4) * 4 + o % 4
            if col < n:
                writes[slab, col] += 1
    assert (hits == 1).all()
    if m:
        assert (writes == 1).all()


def test_cpu_tensors_never_reach_the_cuda_kernels():
    # The CUDA kernels are registered for torch's CUDA dispatch key only: forcing the backend
    # leaves CPU tensors to the reference (and never initialises CUDA).
    import lorenza_kernels as lk

    t, t_ref = torch.zeros(7), torch.zeros(7)
    with lk.use_backend("cuda"):
        assert _registry.active("seeded_axpby_", "cpu") == "reference"
        assert _registry.active("seeded_axpby_", "cuda") == "cuda"
        lk.seeded_axpby_([t], 3, 1.0)
    with lk.use_backend("reference"):
        lk.seeded_axpby_([t_ref], 3, 1.0)
    assert torch.equal(t, t_ref) and not torch.cuda.is_initialized()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
