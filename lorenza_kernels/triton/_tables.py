"""Host side of the multi-tensor launches: the int64 work table.

The kernels get raw addresses from the table; everything that makes an address safe to use
(device, dtype, contiguity, lengths, no overlap) was checked by the op's validator
(``lorenza_kernels/_validate.py``) before this runs. The table is one int64 tensor, filled with
numpy and copied to the device in one transfer (from pinned memory on CUDA, so the copy is
asynchronous):

    header:  seed bits, K, rounding seed bits (0 when unused)
    rows:    K rows of W int64 fields (the tensor's stream among them), then a sentinel row
             holding the work totals.

Float fields hold the float32 bit pattern in the low 32 bits. A field index is a ``tl.constexpr``
so the kernels and this module share one definition of the layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl

from .._dtypes import CODES
from .._shapes import matrix_dims

SEED = tl.constexpr(0)
K = tl.constexpr(1)
RSEED = tl.constexpr(2)
HDR = tl.constexpr(3)

# seeded_axpby_ rows (A_OFFSET: the stream index of element 0, ``offsets=``)
A_ADDR, A_NUMEL, A_NCOLS, A_DTYPE, A_ROWVEC = (tl.constexpr(i) for i in range(5))
A_CHUNK0, A_ALPHA, A_BETA, A_GAMMA, A_STREAM = (tl.constexpr(i) for i in range(5, 10))
A_OFFSET = tl.constexpr(10)
A_W = tl.constexpr(11)

# stochastic_round_ rows
R_DST, R_SRC, R_NUMEL, R_DTYPE, R_CHUNK0, R_STREAM, R_OFFSET = (tl.constexpr(i) for i in range(7))
R_W = tl.constexpr(7)

# seeded_colsum rows
C_OUT, C_M, C_NCOLS, C_CT, C_RPI, C_PBASE, C_ITEM0, C_FITEM0, C_STREAM = (tl.constexpr(i) for i in range(9))
C_OFFSET = tl.constexpr(9)
C_W = tl.constexpr(10)


@dataclass
class Plan:
    device: torch.device
    table: torch.Tensor | None = None
    work: int = 0  # programs of the main launch
    dtypes: frozenset = frozenset()
    aligned: bool = True
    finish: int = 0  # programs of the colsum finishing launch
    partial_size: int = 0
    outputs: list = field(default_factory=list)
    keep: list = field(default_factory=list)  # tensors whose addresses are in the table


def _device(tensors: list[torch.Tensor]) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def _float_bits(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.int64)


def _upload(header: list[int], rows: np.ndarray, device: torch.device) -> torch.Tensor:
    header = list(header) + [0] * (HDR.value - len(header))
    host = torch.from_numpy(np.concatenate([np.asarray(header, dtype=np.int64), rows.reshape(-1)]))
    if device.type == "cuda":
        # The caching host allocator keeps the pinned block until the copy has run.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def axpby_plan(
    tensors, seed, streams, alpha, beta, row_vectors, gamma, chunk: int, rounding_seed=None, offsets=None
) -> Plan:
    """The work table of one ``seeded_axpby_`` launch (arguments already validated by the op)."""
    n = len(tensors)
    device = _device(tensors)
    plan = Plan(device=device, keep=list(tensors))
    rows = np.zeros((n + 1, A_W.value), dtype=np.int64)
    if row_vectors is not None:
        vecs = [a.to(torch.float32).contiguous() for a in row_vectors]
        rows[:n, A_ROWVEC.value] = [a.data_ptr() for a in vecs]
        rows[:n, A_GAMMA.value] = _float_bits(gamma)
        plan.keep += vecs
    numel = np.asarray([t.numel() for t in tensors], dtype=np.int64)
    chunks = -(-numel // chunk)
    rows[:n, A_ADDR.value] = [t.data_ptr() for t in tensors]
    rows[:n, A_NUMEL.value] = numel
    rows[:n, A_NCOLS.value] = [max(matrix_dims(t)[1], 1) for t in tensors]
    rows[:n, A_DTYPE.value] = [CODES[t.dtype] for t in tensors]
    rows[1:, A_CHUNK0.value] = np.cumsum(chunks)
    rows[:n, A_ALPHA.value] = _float_bits(alpha)
    rows[:n, A_BETA.value] = _float_bits(beta)
    rows[:n, A_STREAM.value] = streams
    if offsets is not None:
        rows[:n, A_OFFSET.value] = offsets
    plan.work = int(chunks.sum())
    live = [t for t in tensors if t.numel()]
    plan.dtypes = frozenset(t.dtype for t in live)
    # 16-byte alignment lets the compiler use 128-bit accesses (chunk starts are multiples of 16 B).
    plan.aligned = all(t.data_ptr() % 16 == 0 for t in live)
    if plan.work:
        plan.table = _upload([seed, n, 0 if rounding_seed is None else rounding_seed], rows, device)
    return plan


def round_plan(dst, src, seed, streams, chunk: int, offsets=None) -> Plan:
    """The work table of one ``stochastic_round_`` launch (arguments already validated by the op)."""
    n = len(dst)
    plan = Plan(device=_device(dst), keep=list(dst) + list(src))
    rows = np.zeros((n + 1, R_W.value), dtype=np.int64)
    numel = np.asarray([t.numel() for t in dst], dtype=np.int64)
    chunks = -(-numel // chunk)
    rows[:n, R_DST.value] = [t.data_ptr() for t in dst]
    rows[:n, R_SRC.value] = [t.data_ptr() for t in src]
    rows[:n, R_NUMEL.value] = numel
    rows[:n, R_DTYPE.value] = [CODES[t.dtype] for t in dst]
    rows[1:, R_CHUNK0.value] = np.cumsum(chunks)
    rows[:n, R_STREAM.value] = streams
    if offsets is not None:
        rows[:n, R_OFFSET.value] = offsets
    plan.work = int(chunks.sum())
    live = [k for k, t in enumerate(dst) if t.numel()]
    plan.dtypes = frozenset(dst[k].dtype for k in live)
    plan.aligned = all(dst[k].data_ptr() % 16 == 0 and src[k].data_ptr() % 16 == 0 for k in live)
    if plan.work:
        plan.table = _upload([seed, n], rows, device=plan.device)
    return plan


def colsum_plan(tensors, seed, streams, bn: int, rb: int, target: int, fbn: int, offsets=None) -> Plan:
    n_t = len(tensors)
    device = _device(tensors)
    plan = Plan(device=device)
    rows = np.zeros((n_t + 1, C_W.value), dtype=np.int64)
    # Rows per item: about `target` elements per program, in whole steps of rb rows. The split
    # depends on the shape only, so the summation order (and the result) never changes.
    rpi_default = rb * max(1, target // (rb * bn))
    item0 = fitem0 = pbase = 0
    for k, t in enumerate(tensors):
        m, n = matrix_dims(t)
        out = torch.empty(n, dtype=torch.float32, device=device)
        plan.outputs.append(out)
        ct = triton.cdiv(n, bn)
        rpi = max(rb, min(rpi_default, triton.cdiv(m, rb) * rb))
        groups = triton.cdiv(m, rpi)
        off = offsets[k] if offsets is not None else 0
        rows[k] = (out.data_ptr(), m, n, max(ct, 1), rpi, pbase, item0, fitem0, streams[k], off)
        item0 += groups * ct
        fitem0 += triton.cdiv(n, fbn)
        pbase += groups * n
    rows[n_t, C_ITEM0.value] = item0
    rows[n_t, C_FITEM0.value] = fitem0
    plan.work, plan.finish, plan.partial_size = item0, fitem0, pbase
    if plan.finish:
        plan.table = _upload([seed, n_t], rows, device)
    return plan
