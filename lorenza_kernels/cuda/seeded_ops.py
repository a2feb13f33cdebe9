"""CUDA C++ seeded perturbation ops (``csrc/cuda/seeded_ops.cu``): tables, buffers and launches.

For a list of K tensors, one call builds a per-tensor metadata table (a numpy structured array
whose layout comes from ``_C.seeded_ops_cuda_layout()``, so it is defined in C++ only), copies it
to the GPU in one pinned, non-blocking H2D copy, allocates the outputs and scratch with the caching
allocator on the current stream, and enqueues the kernels on that stream:

- ``seeded_axpby_``: one multi-tensor kernel over 32 KiB chunks of every tensor, then one small
  kernel that sums each tensor's per-chunk partials of ``z^2`` in chunk order (deterministic);
- ``seeded_colsum``: one kernel over (column tile, row slab) items, then one that sums the slabs;
- ``stochastic_round_``: one multi-tensor kernel over 32 KiB chunks of every destination.

A rounding seed (``seeded_axpby_``) selects a kernel variant that rounds bfloat16/float16 results
stochastically (``docs/rng.md``, "The rounding stream"); the records need nothing more, since the
rounding stream of a tensor is its Gaussian stream's number.

Importing this module touches no GPU (it only registers functions); the table builders work on
any tensors (they read shapes, dtypes and addresses), which lets CPU-only tests check them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import torch

from .. import _dtypes, _ext
from .._registry import register
from .._shapes import matrix_dims

_U64 = (1 << 64) - 1


@functools.cache
def layout() -> SimpleNamespace:
    """Kernel constants and the numpy dtypes mirroring ``AxpbyRecord`` / ``ColsumRecord`` / ``RoundRecord``."""
    raw = _ext._C.seeded_ops_cuda_layout()

    def record_dtype(desc: dict) -> np.dtype:
        names = list(desc["fields"])
        return np.dtype(
            {
                "names": names,
                "offsets": [desc["fields"][n][0] for n in names],
                "formats": [desc["fields"][n][1] for n in names],
                "itemsize": desc["itemsize"],
            }
        )

    return SimpleNamespace(
        threads=raw["threads"],
        unit_bytes=raw["unit_bytes"],
        chunk_units=raw["chunk_units"],
        colsum_tc_log2_cap=raw["colsum_tc_log2_cap"],
        colsum_max_slabs=raw["colsum_max_slabs"],
        colsum_min_rows_per_thread=raw["colsum_min_rows_per_thread"],
        axpby=record_dtype(raw["axpby_record"]),
        colsum=record_dtype(raw["colsum_record"]),
        round=record_dtype(raw["round_record"]),
    )


def _ceil_div(a, b):
    return -(-a // b)


def _shapes(tensors: Sequence[torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Addresses, element counts and (m, n) of each tensor's matrix view (``_shapes.matrix_dims``),
    gathered in one pass: the tables are built on every optimizer step, for hundreds of tensors."""
    info = [(t.data_ptr(), t.numel(), t.shape) for t in tensors]
    ptr = np.array([i[0] for i in info], dtype=np.uint64)
    numel = np.array([i[1] for i in info], dtype=np.int64)
    m = np.array([s[0] if len(s) >= 2 else 1 for _, _, s in info], dtype=np.int64)
    n = np.array([math.prod(s[1:]) if len(s) >= 2 else c for _, c, s in info], dtype=np.int64)
    return ptr, numel, m, n


def axpby_table(
    tensors: Sequence[torch.Tensor],
    alpha: Sequence[float],
    beta: Sequence[float],
    streams: Sequence[int],
    rows: Sequence[torch.Tensor] | None = None,
    gamma: Sequence[float] | None = None,
    offsets: Sequence[int] | None = None,
) -> tuple[np.ndarray, int]:
    """The ``AxpbyRecord`` table and the number of chunks (the unit and chunk sizes of the kernel)."""
    lay = layout()
    k = len(tensors)
    rec = np.zeros(k, dtype=lay.axpby)
    if k == 0:
        return rec, 0
    ptr, numel, _, n = _shapes(tensors)
    per_unit = np.array([lay.unit_bytes // t.element_size() for t in tensors], dtype=np.int64)
    chunks = _ceil_div(_ceil_div(numel, per_unit), lay.chunk_units)
    rec["data"], rec["numel"], rec["ncols"] = ptr, numel, np.maximum(n, 1)
    rec["chunk_begin"] = np.cumsum(chunks) - chunks
    beta64 = np.asarray(beta, dtype=np.float64)
    with np.errstate(over="ignore"):  # |alpha| > 3.4e38 rounds to inf, as torch's float32 scalar does
        rec["alpha"] = np.asarray(alpha, dtype=np.float64).astype(np.float32)
        rec["beta"] = beta64.astype(np.float32)
        rec["read_t"] = beta64 != 0.0  # as the reference decides it, before rounding
        if rows is not None and gamma is not None:
            gamma64 = np.asarray(gamma, dtype=np.float64)
            rec["gamma"] = gamma64.astype(np.float32)
            # gamma == 0 adds nothing: the kernel then never reads the row (NaN in it stays out).
            rec["row"] = np.where(gamma64 != 0.0, np.array([a.data_ptr() for a in rows], dtype=np.uint64), 0)
    rec["stream"] = np.asarray(streams, dtype=np.int64).astype(np.uint32)
    rec["dtype"] = [_dtypes.CODES[t.dtype] for t in tensors]
    if offsets is not None:
        rec["offset"] = offsets
    return rec, int(chunks.sum())


def round_table(
    dst: Sequence[torch.Tensor],
    src: Sequence[torch.Tensor],
    streams: Sequence[int],
    offsets: Sequence[int] | None = None,
) -> tuple[np.ndarray, int]:
    """The ``RoundRecord`` table and the number of chunks (16-byte units of dst, as ``axpby_table``)."""
    lay = layout()
    k = len(dst)
    rec = np.zeros(k, dtype=lay.round)
    if k == 0:
        return rec, 0
    numel = np.array([t.numel() for t in dst], dtype=np.int64)
    per_unit = np.array([lay.unit_bytes // t.element_size() for t in dst], dtype=np.int64)
    chunks = _ceil_div(_ceil_div(numel, per_unit), lay.chunk_units)
    rec["dst"] = np.array([t.data_ptr() for t in dst], dtype=np.uint64)
    rec["src"] = np.array([t.data_ptr() for t in src], dtype=np.uint64)
    rec["numel"], rec["chunk_begin"] = numel, np.cumsum(chunks) - chunks
    rec["stream"] = np.asarray(streams, dtype=np.int64).astype(np.uint32)
    rec["dtype"] = [_dtypes.CODES[t.dtype] for t in dst]
    if offsets is not None:
        rec["offset"] = offsets
    return rec, int(chunks.sum())


def colsum_table(
    tensors: Sequence[torch.Tensor],
    outs: Sequence[torch.Tensor],
    streams: Sequence[int],
    offsets: Sequence[int] | None = None,
) -> tuple[np.ndarray, int, int]:
    """The ``ColsumRecord`` table, the number of work items and the workspace size (floats).

    Tensor k (m x n) is cut into groups of 4 columns, TC = min(64, next_pow2(groups)) groups per
    item (up to 256 when m <= 2) and TR = 256 / TC thread rows, and at most 16 row slabs of a
    multiple of TR rows (at least 64 rows per thread). Only tensors with several slabs use the
    workspace (slabs x n floats).
    """
    lay = layout()
    k = len(tensors)
    rec = np.zeros(k, dtype=lay.colsum)
    if k == 0:
        return rec, 0, 0
    _, _, m, n = _shapes(tensors)
    groups = _ceil_div(n, 4)
    # min(cap, ceil(log2 groups)), the cap raised for 1- and 2-row matrices so that no thread row idles.
    cap = lay.colsum_tc_log2_cap + 2 - np.minimum(m - 1, 2).clip(0)
    tc_log2 = np.minimum(sum((groups > (1 << b)).astype(np.int64) for b in range(8)), cap)
    tr = lay.threads >> tc_log2
    col_tiles = _ceil_div(groups, 1 << tc_log2)
    rows_per_slab = tr * np.maximum(lay.colsum_min_rows_per_thread, _ceil_div(m, lay.colsum_max_slabs * tr))
    slabs = _ceil_div(m, rows_per_slab)
    items = col_tiles * slabs
    ws = np.where(slabs > 1, slabs * n, 0)
    rec["out"] = [o.data_ptr() for o in outs]
    rec["m"], rec["n"], rec["item_begin"] = m, n, np.cumsum(items) - items
    rec["ws_begin"] = np.where(slabs > 1, np.cumsum(ws) - ws, -1)
    rec["col_tiles"], rec["rows_per_slab"], rec["tc_log2"] = col_tiles, rows_per_slab, tc_log2
    rec["stream"] = np.asarray(streams, dtype=np.int64).astype(np.uint32)
    if offsets is not None:
        rec["offset"] = offsets
    return rec, int(items.sum()), int(ws.sum())


def _upload(rec: np.ndarray, device: torch.device) -> torch.Tensor:
    """One H2D copy of the table. From pinned memory the copy is asynchronous on the current
    stream; the host allocator keeps the pinned block alive until the copy has run."""
    host = torch.from_numpy(rec.view(np.uint8)).pin_memory()
    return host.to(device, non_blocking=True)


def _float_rows(row_vectors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [a.reshape(-1).to(torch.float32).contiguous() for a in row_vectors]


@register("seeded_axpby_", "cuda", "cuda")
def seeded_axpby_(
    tensors: list[torch.Tensor],
    seed: int,
    streams: list[int],
    alpha: list[float],
    beta: list[float],
    row_vectors: list[torch.Tensor] | None = None,
    gamma: list[float] | None = None,
    rounding_seed: int | None = None,
    offsets: list[int] | None = None,
) -> torch.Tensor:
    """``t_k <- beta_k t_k + alpha_k z_k [+ gamma_k a_k[i % n_k]]`` in place; returns ``sum(z_k^2)``.
    With ``rounding_seed``, 16-bit tensors are rounded stochastically; element ``i`` of ``t_k`` is
    stream index ``offsets[k] + i``."""
    device = tensors[0].device  # the CUDA key: CUDA tensors (an empty list never reaches it)
    rows = _float_rows(row_vectors) if row_vectors is not None else None
    with torch.cuda.device(device):
        rec, num_chunks = axpby_table(tensors, alpha, beta, streams, rows, gamma, offsets)
        table = _upload(rec, device)
        partials = torch.empty(num_chunks, dtype=torch.float64, device=device)
        norms = torch.empty(len(tensors), dtype=torch.float32, device=device)
        _ext._C.seeded_axpby_cuda(
            device.index,
            table.data_ptr(),
            len(tensors),
            num_chunks,
            int(seed) & _U64,
            bool(rows is not None and rec["row"].any()),
            partials.data_ptr(),
            norms.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream,
            rounding_seed is not None and any(t.dtype != torch.float32 for t in tensors),
            0 if rounding_seed is None else int(rounding_seed) & _U64,
        )
    return norms


@register("stochastic_round_", "cuda", "cuda")
def stochastic_round_(
    dst: list[torch.Tensor], src: list[torch.Tensor], seed: int, streams: list[int], offsets: list[int] | None = None
) -> None:
    """``dst_k <- SR(src_k)`` for the whole list in one launch (docs/rng.md, "The rounding stream")."""
    device = dst[0].device
    with torch.cuda.device(device):
        rec, num_chunks = round_table(dst, src, streams, offsets)
        if num_chunks == 0:
            return
        table = _upload(rec, device)
        _ext._C.stochastic_round_cuda(
            device.index,
            table.data_ptr(),
            len(dst),
            num_chunks,
            int(seed) & _U64,
            torch.cuda.current_stream(device).cuda_stream,
        )


@register("seeded_colsum", "cuda", "cuda")
def seeded_colsum(
    tensors: list[torch.Tensor], seed: int, streams: list[int], offsets: list[int] | None = None
) -> list[torch.Tensor]:
    """Column sums (float32, length n_k) of ``z_k`` viewed as ``m_k x n_k``; reads no tensor data."""
    device = tensors[0].device
    with torch.cuda.device(device):
        outs = [torch.empty(matrix_dims(t)[1], dtype=torch.float32, device=device) for t in tensors]
        rec, num_items, ws_floats = colsum_table(tensors, outs, streams, offsets)
        table = _upload(rec, device)
        workspace = torch.empty(ws_floats, dtype=torch.float32, device=device)
        _ext._C.seeded_colsum_cuda(
            device.index,
            table.data_ptr(),
            len(tensors),
            num_items,
            int(seed) & _U64,
            workspace.data_ptr(),
            torch.cuda.current_stream(device).cuda_stream,
        )
    return outs
