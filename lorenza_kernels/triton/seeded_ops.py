"""Triton seeded perturbation ops (docs/kernels.md section 1): multi-tensor, in place, one pass.

Launch layout. A whole list of tensors, of mixed dtypes, is one launch of ``_seeded_axpby_kernel``.
The host writes one int64 table (``_tables.py``): a header (seed bits, K) and one row per tensor
(address, numel, columns, dtype code, row-vector address, first work item, alpha / beta / gamma as
float32 bits, stream), copied to the device in one transfer. Each tensor is cut into chunks of
``BLOCK * ITERS`` elements; program ``pid`` finds its tensor by a binary search over the rows'
first-chunk column (tensors without chunks are never found) and turns the stored address into a
typed pointer (``int64.to(tl.pointer_type(...))``) in the branch of its dtype; a dtype absent from
the list is compiled out. Work split and summation order depend on the shapes only, never on the GPU,
so every result is bitwise reproducible; no float atomics: each program writes its partial sum of
``z^2`` and ``_seeded_norms_kernel`` (a second, tiny launch: one program per tensor) adds them in
chunk order, in float64.

``seeded_colsum`` reads no tensor data: ``_seeded_colsum_kernel`` tiles each ``m x n`` view into
(row group, column tile) items, each summing its rows of ``z`` into a partial row, and
``_seeded_colsum_finish_kernel`` adds the partial rows of every column in row-group order into the
outputs (their addresses are in the table too). Rows of a tensor whose ``n`` is a multiple of 4 start
on Philox block boundaries and get four normals per Philox call; other shapes fall back to one call
per element.

GPU tuning (untested on a GPU so far). BLOCK 2048 x ITERS 4 with 8 warps gives each thread two
Philox blocks per step (8 elements: one 16-byte access in bfloat16, two in float32; the sm_90 build
has 128-bit loads and stores, 54-60 registers, no spills). On an H200 try first BLOCK 1024/2048/4096
x num_warps 4/8 and ITERS 1-8. The arithmetic is about 10 integer instructions per element for
Philox and 25-30 for Box-Muller, so bfloat16 (2 bytes per element) is expected to be bound by the
arithmetic, not by bandwidth; float32 should come close to copy bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import register
from . import _tables as T
from ._common import device_guard
from ._env import DEVICE_TYPES, INTERPRET
from .rng import normal_at, normals, philox_normals, rounding_word_at, rounding_words, stochastic_round

#: Defaults for the GPU; tests pass smaller ones to exercise many chunks on small tensors.
BLOCK, ITERS, NUM_WARPS = 2048, 4, 8
COL_BLOCK, COL_ROWS, COL_TARGET, FIN_BLOCK = 256, 8, 1 << 18, 1024


@triton.jit
def _find_row(tab_ptr, pid, COL: tl.constexpr, W: tl.constexpr):
    """The largest k < K with ``row[k][COL] <= pid`` (rows sorted by COL; row K is a sentinel)."""
    lo = pid * 0
    hi = tl.load(tab_ptr + T.K)
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        right = tl.load(tab_ptr + T.HDR + mid * W + COL) <= pid
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    return lo


@triton.jit
def _f32(bits):
    return bits.to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _round(val, DTYPE: tl.constexpr, RNE_BY_HAND: tl.constexpr):
    """float32 -> DTYPE, round to nearest even. The interpreter truncates float32 -> bfloat16
    (triton/runtime/interpreter.py, cast_impl), so there the rounding is done on the bits."""
    if RNE_BY_HAND and DTYPE == tl.bfloat16:
        bits = val.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        # keep NaN a (quiet) NaN: truncating one whose payload is in the low half would give Inf
        out = tl.where(val != val, (bits >> 16) | 0x40, rounded)
        return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return val.to(DTYPE)


@triton.jit
def _store_value(val, words, DTYPE: tl.constexpr, ROUND: tl.constexpr, RNE_BY_HAND: tl.constexpr):
    """The float32 ``val`` as stored in ``DTYPE``: stochastically rounded with the rounding ``words``
    when ``ROUND`` (16-bit dtypes only), else to nearest even."""
    if ROUND and DTYPE != tl.float32:
        val = stochastic_round(val, words, DTYPE)  # exact in DTYPE: _round stores it unchanged
    return _round(val, DTYPE, RNE_BY_HAND)


@triton.jit
def _axpby_step(
    t_ptr,
    r_ptr,
    off0,
    numel,
    ncols,
    z,
    alpha,
    beta,
    gamma,
    rseed,
    stream,
    goff,
    BLOCK: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    FULL: tl.constexpr,
    ROUND: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
):
    """One block of ``t <- beta t + alpha z + gamma a[col]``, rounded once to t's dtype; element ``i``
    draws the rounding word of index ``goff + i`` (``goff`` the tensor's offset).

    ``beta`` and ``gamma`` are tested with uniform branches rather than folded into the load
    masks: a mask that is not a bounds test would defeat vectorisation (and the interpreter
    mis-broadcasts scalar booleans). ``FULL`` blocks have no bounds mask at all. With ``ROUND``
    a 16-bit t is rounded stochastically: one more Philox call per 4 elements, for the rounding
    words of the block (the rounding stream of ``(rseed, stream)``).
    """
    offs = off0 + tl.arange(0, BLOCK)
    inb = offs < numel
    val = alpha * z
    if beta != 0.0:  # beta == 0 never reads t: NaN or Inf in it cannot propagate (BLAS rule)
        if FULL:
            t = tl.load(t_ptr + offs)
        else:
            t = tl.load(t_ptr + offs, mask=inb, other=0.0)
        val = beta * t.to(tl.float32) + val
    if HAS_ROWS:
        if gamma != 0.0:
            # col = offs % ncols without a 64-bit division per element: one scalar modulo, then a
            # conditional subtraction when a block spans at most two rows.
            col = off0 % ncols + tl.arange(0, BLOCK)
            if ncols >= BLOCK:
                col = tl.where(col >= ncols, col - ncols, col)
            else:
                col = col % ncols
            val += gamma * tl.load(r_ptr + col, mask=inb, other=0.0)
    words = val.to(tl.uint32, bitcast=True)  # a placeholder: only read when ROUND
    if ROUND and t_ptr.dtype.element_ty != tl.float32:
        if goff % 4 == 0:
            words = rounding_words(rseed, (goff + off0) >> 2, stream, BLOCK // 4)
        else:  # an offset inside a Philox block: one call per element
            words = rounding_word_at(rseed, goff + offs, stream)
    out = _store_value(val, words, t_ptr.dtype.element_ty, ROUND, RNE_BY_HAND)
    if FULL:
        tl.store(t_ptr + offs, out)
    else:
        tl.store(t_ptr + offs, out, mask=inb)


@triton.jit
def _axpby_typed(
    addr,
    DTYPE: tl.constexpr,
    r_ptr,
    off0,
    numel,
    ncols,
    z,
    alpha,
    beta,
    gamma,
    rseed,
    stream,
    goff,
    BLOCK: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    ALIGNED: tl.constexpr,
    ROUND: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
):
    p = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # On the int-to-pointer cast itself: AxisInfo reads hints on the defining op (a hint on
        # a helper's argument would be dropped). Chunk starts are multiples of 16 bytes.
        p = tl.multiple_of(p, 16)
    # Whole blocks without a bounds mask, so that loads and stores vectorise.
    if off0 + BLOCK <= numel:
        _axpby_step(
            p, r_ptr, off0, numel, ncols, z, alpha, beta, gamma, rseed, stream, goff, BLOCK, HAS_ROWS, True, ROUND,
            RNE_BY_HAND,
        )  # fmt: skip
    else:
        _axpby_step(
            p, r_ptr, off0, numel, ncols, z, alpha, beta, gamma, rseed, stream, goff, BLOCK, HAS_ROWS, False, ROUND,
            RNE_BY_HAND,
        )  # fmt: skip


@triton.jit
def _seeded_axpby_kernel(
    tab_ptr,
    partial_ptr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    HAS_F32: tl.constexpr,
    HAS_BF16: tl.constexpr,
    HAS_F16: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    ALIGNED: tl.constexpr,
    ROUND: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
):
    """For the tensor of chunk ``pid``: ``t <- beta t + alpha z + gamma 1 a^T`` on its chunk, in
    float32 rounded once to t's dtype (stochastically for 16-bit dtypes when ``ROUND``, with the
    rounding seed of the table's header); ``partial[pid] = sum(z^2)`` over the chunk."""
    pid = tl.program_id(0).to(tl.int64)
    k = _find_row(tab_ptr, pid, T.A_CHUNK0, T.A_W)
    row = tab_ptr + T.HDR + k * T.A_W
    seed = tl.load(tab_ptr + T.SEED).to(tl.uint64, bitcast=True)
    rseed = tl.load(tab_ptr + T.RSEED).to(tl.uint64, bitcast=True)
    stream = tl.load(row + T.A_STREAM).to(tl.uint32)
    start = (pid - tl.load(row + T.A_CHUNK0)) * (BLOCK * ITERS)
    numel = tl.load(row + T.A_NUMEL)
    ncols = tl.load(row + T.A_NCOLS)
    addr = tl.load(row + T.A_ADDR)
    r_ptr = tl.load(row + T.A_ROWVEC).to(tl.pointer_type(tl.float32))
    alpha = _f32(tl.load(row + T.A_ALPHA))
    beta = _f32(tl.load(row + T.A_BETA))
    gamma = _f32(tl.load(row + T.A_GAMMA))
    dt = tl.load(row + T.A_DTYPE)
    goff = tl.load(row + T.A_OFFSET)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for it in range(ITERS):
        off0 = start + it * BLOCK
        if off0 < numel:
            # One copy of the Philox / Box-Muller code; only the memory side depends on the dtype
            # (uniform branches; dtypes absent from the list are compiled out). Element i is stream
            # index goff + i: four normals per Philox call when goff is a multiple of 4.
            if goff % 4 == 0:
                z = normals(seed, (goff + off0) >> 2, stream, BLOCK // 4)
            else:
                z = normal_at(seed, goff + off0 + tl.arange(0, BLOCK), stream)
            if HAS_F32:
                if dt == 0:
                    _axpby_typed(
                        addr, tl.float32, r_ptr, off0, numel, ncols, z, alpha, beta, gamma, rseed, stream, goff,
                        BLOCK, HAS_ROWS, ALIGNED, ROUND, RNE_BY_HAND,
                    )  # fmt: skip
            if HAS_BF16:
                if dt == 1:
                    _axpby_typed(
                        addr, tl.bfloat16, r_ptr, off0, numel, ncols, z, alpha, beta, gamma, rseed, stream, goff,
                        BLOCK, HAS_ROWS, ALIGNED, ROUND, RNE_BY_HAND,
                    )  # fmt: skip
            if HAS_F16:
                if dt == 2:
                    _axpby_typed(
                        addr, tl.float16, r_ptr, off0, numel, ncols, z, alpha, beta, gamma, rseed, stream, goff,
                        BLOCK, HAS_ROWS, ALIGNED, ROUND, RNE_BY_HAND,
                    )  # fmt: skip
            acc += tl.where(off0 + tl.arange(0, BLOCK) < numel, z * z, 0.0)
    tl.store(partial_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def _round_typed(
    addr, DTYPE: tl.constexpr, v, off0, numel, seed, stream, goff, BLOCK: tl.constexpr, FULL: tl.constexpr,
    ALIGNED: tl.constexpr, RNE_BY_HAND: tl.constexpr,
):  # fmt: skip
    """Store one block of ``SR(v)`` (a copy for float32) into the ``DTYPE`` tensor at ``addr``;
    element ``i`` takes the rounding word ``goff + i``."""
    p = addr.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    offs = off0 + tl.arange(0, BLOCK)
    words = v.to(tl.uint32, bitcast=True)  # a placeholder for float32
    if DTYPE != tl.float32:
        if goff % 4 == 0:
            words = rounding_words(seed, (goff + off0) >> 2, stream, BLOCK // 4)
        else:
            words = rounding_word_at(seed, goff + offs, stream)
    out = _store_value(v, words, DTYPE, True, RNE_BY_HAND)
    if FULL:
        tl.store(p + offs, out)
    else:
        tl.store(p + offs, out, mask=offs < numel)


@triton.jit
def _stochastic_round_kernel(
    tab_ptr,
    BLOCK: tl.constexpr,
    ITERS: tl.constexpr,
    HAS_F32: tl.constexpr,
    HAS_BF16: tl.constexpr,
    HAS_F16: tl.constexpr,
    ALIGNED: tl.constexpr,
    RNE_BY_HAND: tl.constexpr,
):
    """For the tensor pair of chunk ``pid``: ``dst <- SR(src)`` on its chunk (rounding stream of the
    table's seed and the row's stream; a plain copy into a float32 dst)."""
    pid = tl.program_id(0).to(tl.int64)
    k = _find_row(tab_ptr, pid, T.R_CHUNK0, T.R_W)
    row = tab_ptr + T.HDR + k * T.R_W
    seed = tl.load(tab_ptr + T.SEED).to(tl.uint64, bitcast=True)
    stream = tl.load(row + T.R_STREAM).to(tl.uint32)
    start = (pid - tl.load(row + T.R_CHUNK0)) * (BLOCK * ITERS)
    numel = tl.load(row + T.R_NUMEL)
    addr = tl.load(row + T.R_DST)
    src = tl.load(row + T.R_SRC).to(tl.pointer_type(tl.float32))
    if ALIGNED:
        src = tl.multiple_of(src, 16)
    dt = tl.load(row + T.R_DTYPE)
    goff = tl.load(row + T.R_OFFSET)
    for it in range(ITERS):
        off0 = start + it * BLOCK
        if off0 < numel:
            offs = off0 + tl.arange(0, BLOCK)
            full = off0 + BLOCK <= numel
            if full:
                v = tl.load(src + offs)
            else:
                v = tl.load(src + offs, mask=offs < numel, other=0.0)
            if HAS_F32:
                if dt == 0:
                    if full:
                        _round_typed(
                            addr, tl.float32, v, off0, numel, seed, stream, goff, BLOCK, True, ALIGNED, RNE_BY_HAND
                        )
                    else:
                        _round_typed(
                            addr, tl.float32, v, off0, numel, seed, stream, goff, BLOCK, False, ALIGNED, RNE_BY_HAND
                        )
            if HAS_BF16:
                if dt == 1:
                    if full:
                        _round_typed(
                            addr, tl.bfloat16, v, off0, numel, seed, stream, goff, BLOCK, True, ALIGNED, RNE_BY_HAND
                        )
                    else:
                        _round_typed(
                            addr, tl.bfloat16, v, off0, numel, seed, stream, goff, BLOCK, False, ALIGNED, RNE_BY_HAND
                        )
            if HAS_F16:
                if dt == 2:
                    if full:
                        _round_typed(
                            addr, tl.float16, v, off0, numel, seed, stream, goff, BLOCK, True, ALIGNED, RNE_BY_HAND
                        )
                    else:
                        _round_typed(
                            addr, tl.float16, v, off0, numel, seed, stream, goff, BLOCK, False, ALIGNED, RNE_BY_HAND
                        )


@triton.jit
def _seeded_norms_kernel(tab_ptr, partial_ptr, norm_ptr, FBLOCK: tl.constexpr):
    """``norm[k]`` = the sum of tensor k's chunk partials, in chunk order, in float64."""
    k = tl.program_id(0).to(tl.int64)
    c0 = tl.load(tab_ptr + T.HDR + k * T.A_W + T.A_CHUNK0)
    c1 = tl.load(tab_ptr + T.HDR + (k + 1) * T.A_W + T.A_CHUNK0)
    acc = tl.zeros([FBLOCK], dtype=tl.float64)
    for s in range(c0, c1, FBLOCK):
        idx = s + tl.arange(0, FBLOCK)
        acc += tl.load(partial_ptr + idx, mask=idx < c1, other=0.0).to(tl.float64)
    tl.store(norm_ptr + k, tl.sum(acc, axis=0).to(tl.float32))


@triton.jit
def _seeded_colsum_kernel(tab_ptr, partial_ptr, RB: tl.constexpr, BN: tl.constexpr):
    """Item ``pid`` = (row group g, column tile c) of one tensor: ``partial[g, cols] = sum_rows z``."""
    pid = tl.program_id(0).to(tl.int64)
    k = _find_row(tab_ptr, pid, T.C_ITEM0, T.C_W)
    row = tab_ptr + T.HDR + k * T.C_W
    seed = tl.load(tab_ptr + T.SEED).to(tl.uint64, bitcast=True)
    stream = tl.load(row + T.C_STREAM).to(tl.uint32)
    m = tl.load(row + T.C_M)
    n = tl.load(row + T.C_NCOLS)
    ct = tl.load(row + T.C_CT)
    rpi = tl.load(row + T.C_RPI)
    goff = tl.load(row + T.C_OFFSET)
    item = pid - tl.load(row + T.C_ITEM0)
    g = item // ct
    c = item - g * ct
    r_lo = g * rpi
    r_hi = tl.minimum(m, r_lo + rpi)
    cols = c * BN + tl.arange(0, BN)
    col_ok = cols < n
    acc = tl.zeros([RB, BN], dtype=tl.float32)
    if (n % 4 == 0) & (goff % 4 == 0):
        # Every row starts on a Philox block: four normals per call, interleaved into flat order.
        for r0 in range(r_lo, r_hi, RB):
            rows = r0 + tl.arange(0, RB)
            first = (goff + rows * n + c * BN) >> 2
            z0, z1, z2, z3 = philox_normals(seed, first[:, None] + tl.arange(0, BN // 4)[None, :], stream)
            z = tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))
            acc += tl.where((rows < r_hi)[:, None] & col_ok[None, :], z, 0.0)
    else:
        for r0 in range(r_lo, r_hi, RB):
            rows = r0 + tl.arange(0, RB)
            z = normal_at(seed, goff + rows[:, None] * n + cols[None, :], stream)
            acc += tl.where((rows < r_hi)[:, None] & col_ok[None, :], z, 0.0)
    tl.store(partial_ptr + tl.load(row + T.C_PBASE) + g * n + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _seeded_colsum_finish_kernel(tab_ptr, partial_ptr, FBN: tl.constexpr):
    """``out_k[cols]`` = the sum over row groups of the partial rows, in row-group order, in float64."""
    pid = tl.program_id(0).to(tl.int64)
    k = _find_row(tab_ptr, pid, T.C_FITEM0, T.C_W)
    row = tab_ptr + T.HDR + k * T.C_W
    m = tl.load(row + T.C_M)
    n = tl.load(row + T.C_NCOLS)
    rpi = tl.load(row + T.C_RPI)
    base = tl.load(row + T.C_PBASE)
    cols = (pid - tl.load(row + T.C_FITEM0)) * FBN + tl.arange(0, FBN)
    ok = cols < n
    acc = tl.zeros([FBN], dtype=tl.float64)
    for g in range(0, (m + rpi - 1) // rpi):
        acc += tl.load(partial_ptr + base + g * n + cols, mask=ok, other=0.0).to(tl.float64)
    out = tl.load(row + T.C_OUT).to(tl.pointer_type(tl.float32))
    tl.store(out + cols, acc.to(tl.float32), mask=ok)


@register("seeded_axpby_", "triton", DEVICE_TYPES)
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
    *,
    block: int = BLOCK,
    iters: int = ITERS,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """``t_k <- beta_k t_k + alpha_k z_k [+ gamma_k 1 a_k^T]`` in place; returns ``sum(z_k^2)``.

    ``seed`` is the int64 encoding of the uint64 seed (its 64 bits go to the kernel unchanged and
    are read back as a uint64 for ``tl.philox``). One launch for the list, one for the norms.
    With ``rounding_seed`` (same encoding) 16-bit tensors are rounded stochastically.
    """
    # A block of at least 16 elements keeps every block start 16-byte aligned (the ALIGNED hint).
    if block < 16 or block & (block - 1) or iters < 1:
        raise ValueError(f"block, iters: need a power of two >= 16 and >= 1, got {block}, {iters}")
    plan = T.axpby_plan(tensors, seed, streams, alpha, beta, row_vectors, gamma, block * iters, rounding_seed, offsets)
    norms = torch.empty(len(tensors), dtype=torch.float32, device=plan.device)
    if plan.work == 0:
        return norms.zero_()
    partial = torch.empty(plan.work, dtype=torch.float32, device=plan.device)
    with device_guard(plan.device):
        _seeded_axpby_kernel[(plan.work,)](
            plan.table,
            partial,
            BLOCK=block,
            ITERS=iters,
            HAS_F32=torch.float32 in plan.dtypes,
            HAS_BF16=torch.bfloat16 in plan.dtypes,
            HAS_F16=torch.float16 in plan.dtypes,
            HAS_ROWS=row_vectors is not None,
            ALIGNED=plan.aligned,
            ROUND=rounding_seed is not None and bool(plan.dtypes - {torch.float32}),
            RNE_BY_HAND=INTERPRET,
            num_warps=num_warps,
        )
        _seeded_norms_kernel[(len(tensors),)](plan.table, partial, norms, FBLOCK=FIN_BLOCK, num_warps=4)
    return norms


@register("seeded_colsum", "triton", DEVICE_TYPES)
def seeded_colsum(
    tensors: list[torch.Tensor],
    seed: int,
    streams: list[int],
    offsets: list[int] | None = None,
    *,
    col_block: int = COL_BLOCK,
    col_rows: int = COL_ROWS,
    target: int = COL_TARGET,
    fin_block: int = FIN_BLOCK,
) -> list[torch.Tensor]:
    """Column sums of ``z_k`` viewed as ``m x n`` (float32), reading only the tensors' shapes."""
    plan = T.colsum_plan(tensors, seed, streams, col_block, col_rows, target, fin_block, offsets)
    if plan.finish == 0:  # every output is empty
        return plan.outputs
    partial = torch.empty(max(plan.partial_size, 1), dtype=torch.float32, device=plan.device)
    with device_guard(plan.device):
        if plan.work:  # zero when no tensor has rows: the outputs are then zeros
            _seeded_colsum_kernel[(plan.work,)](plan.table, partial, RB=col_rows, BN=col_block, num_warps=8)
        _seeded_colsum_finish_kernel[(plan.finish,)](plan.table, partial, FBN=fin_block, num_warps=4)
    return plan.outputs


@register("stochastic_round_", "triton", DEVICE_TYPES)
def stochastic_round_(
    dst: list[torch.Tensor],
    src: list[torch.Tensor],
    seed: int,
    streams: list[int],
    offsets: list[int] | None = None,
    *,
    block: int = BLOCK,
    iters: int = ITERS,
    num_warps: int = NUM_WARPS,
) -> None:
    """``dst_k <- SR(src_k)`` for the whole list in one launch (docs/rng.md, "The rounding stream")."""
    if block < 16 or block & (block - 1) or iters < 1:
        raise ValueError(f"block, iters: need a power of two >= 16 and >= 1, got {block}, {iters}")
    plan = T.round_plan(dst, src, seed, streams, block * iters, offsets)
    if plan.work == 0:
        return
    with device_guard(plan.device):
        _stochastic_round_kernel[(plan.work,)](
            plan.table,
            BLOCK=block,
            ITERS=iters,
            HAS_F32=torch.float32 in plan.dtypes,
            HAS_BF16=torch.bfloat16 in plan.dtypes,
            HAS_F16=torch.float16 in plan.dtypes,
            ALIGNED=plan.aligned,
            RNE_BY_HAND=INTERPRET,
            num_warps=num_warps,
        )
