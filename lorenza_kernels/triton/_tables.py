"""Host side of the multi-tensor launches: argument checks and the int64 work table.

The kernels get raw addresses from the table, so everything that makes an address safe to use
(device, dtype, contiguity, lengths) is checked here, before any launch, with an error that names
the argument. The table is one int64 tensor, filled with numpy and copied to the device in one
transfer (from pinned memory on CUDA, so the copy is asynchronous):

    header:  seed bits, first stream, K
    rows:    K rows of W int64 fields, then a sentinel row holding the work totals.

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
STREAM = tl.constexpr(1)
K = tl.constexpr(2)
HDR = tl.constexpr(3)

# seeded_axpby_ rows
A_ADDR, A_NUMEL, A_NCOLS, A_DTYPE, A_ROWVEC = (tl.constexpr(i) for i in range(5))
A_CHUNK0, A_ALPHA, A_BETA, A_GAMMA = (tl.constexpr(i) for i in range(5, 9))
A_W = tl.constexpr(9)

# seeded_colsum rows
C_OUT, C_M, C_NCOLS, C_CT, C_RPI, C_PBASE, C_ITEM0, C_FITEM0 = (tl.constexpr(i) for i in range(8))
C_W = tl.constexpr(8)

_STREAM_LIMIT = 1 << 32
_INT64 = (-(1 << 63), 1 << 63)


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


def _device(tensors: list[torch.Tensor], name: str) -> torch.device:
    if not tensors:
        return torch.device("cpu")
    device = tensors[0].device
    for k, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{k}]: expected a tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name}[{k}]: on {t.device}, but {name}[0] is on {device}")
    return device


def _check_disjoint(tensors: list[torch.Tensor]) -> None:
    """The kernels update all tensors at once: overlapping ones would race (the reference runs them
    one after another), so they are refused."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes, k) for k, t in enumerate(tensors) if t.numel())
    for (_, end, i), (begin, _, j) in zip(spans, spans[1:]):
        if begin < end:
            i, j = sorted((i, j))
            raise ValueError(f"tensors[{i}], tensors[{j}]: overlap in memory; the update needs distinct tensors")


def _check_scalars(seed: int, first_stream: int, count: int) -> None:
    if not _INT64[0] <= seed < _INT64[1]:
        raise ValueError(f"seed: expected the int64 encoding of a uint64 seed, got {seed}")
    if first_stream < 0 or first_stream + max(count, 1) - 1 >= _STREAM_LIMIT:
        raise ValueError(f"first_stream: streams {first_stream}..{first_stream + count - 1} must lie in [0, 2**32)")


def _float_bits(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float32).view(np.uint32).astype(np.int64)


def _upload(header: list[int], rows: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(np.concatenate([np.asarray(header, dtype=np.int64), rows.reshape(-1)]))
    if device.type == "cuda":
        # The caching host allocator keeps the pinned block until the copy has run.
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def axpby_plan(tensors, seed, alpha, beta, first_stream, row_vectors, gamma, chunk: int) -> Plan:
    n = len(tensors)
    device = _device(tensors, "tensors")
    _check_scalars(seed, first_stream, n)
    for name, vals in (("alpha", alpha), ("beta", beta)) + ((("gamma", gamma),) if row_vectors is not None else ()):
        if vals is None or len(vals) != n:
            raise ValueError(f"{name}: expected {n} values, got {None if vals is None else len(vals)}")
    for k, t in enumerate(tensors):
        if t.dtype not in CODES:
            raise TypeError(f"tensors[{k}]: dtype {t.dtype} is not supported (float32, bfloat16, float16)")
        if not t.is_contiguous():
            raise ValueError(f"tensors[{k}]: must be contiguous")
    _check_disjoint(tensors)
    plan = Plan(device=device, keep=list(tensors))
    rows = np.zeros((n + 1, A_W.value), dtype=np.int64)
    if row_vectors is not None:
        if len(row_vectors) != n:
            raise ValueError(f"row_vectors: expected {n} tensors, got {len(row_vectors)}")
        _device(list(row_vectors) + list(tensors[:1]), "row_vectors")
        vecs = [a.to(torch.float32).contiguous() for a in row_vectors]
        for k, (a, t) in enumerate(zip(vecs, tensors)):
            if a.dim() != 1 or a.numel() != matrix_dims(t)[1]:
                raise ValueError(f"row_vectors[{k}]: expected shape ({matrix_dims(t)[1]},), got {tuple(a.shape)}")
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
    plan.work = int(chunks.sum())
    live = [t for t in tensors if t.numel()]
    plan.dtypes = frozenset(t.dtype for t in live)
    # 16-byte alignment lets the compiler use 128-bit accesses (chunk starts are multiples of 16 B).
    plan.aligned = all(t.data_ptr() % 16 == 0 for t in live)
    if plan.work:
        plan.table = _upload([seed, first_stream, n], rows, device)
    return plan


def colsum_plan(tensors, seed, first_stream, bn: int, rb: int, target: int, fbn: int) -> Plan:
    n_t = len(tensors)
    device = _device(tensors, "tensors")
    _check_scalars(seed, first_stream, n_t)
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
        rows[k] = (out.data_ptr(), m, n, max(ct, 1), rpi, pbase, item0, fitem0)
        item0 += groups * ct
        fitem0 += triton.cdiv(n, fbn)
        pbase += groups * n
    rows[n_t, C_ITEM0.value] = item0
    rows[n_t, C_FITEM0.value] = fitem0
    plan.work, plan.finish, plan.partial_size = item0, fitem0, pbase
    if plan.finish:
        plan.table = _upload([seed, first_stream, n_t], rows, device)
    return plan
