"""Triton sketch of the randomized SVD: Y = A Omega with Omega generated inside the GEMM.

(``SKETCH = "stored"`` switches to a one-pass Triton generator of Omega and a cuBLAS bmm.)

Omega is never stored: every program regenerates the (BLOCK_R x BLOCK_C) tile of Omega it
multiplies from the lorenza-philox-v1 stream (``shared/docs/rng.md``), with the convention of
``reference/rsvd.py``: ``Omega_b[j, c] = z(seed, streams[b], c * n + j)`` (Omega^T is the
row-major stream tensor of shape (k, n)).

Philox yields four normals per call, for four consecutive flat indices. When n % 4 == 0 the four
rows j = 4t..4t+3 of one tile column share a call, so the kernel generates a (BLOCK_R/4 x BLOCK_C)
tile of Philox outputs and does four dots, each against the A columns j = 4t + lane (a stride-4
gather of A's tile, the other three gathers hit the same cache lines): no work is wasted. For other
n the four lanes of a call straddle columns of Omega, so each element runs its own call and keeps
its lane (four times the Philox work; n % 4 != 0 never occurs for LLM weights).

The tile of Omega is regenerated once per BLOCK_M rows of A. The arithmetic is float32
(``input_precision="ieee"``: the sketch is part of the fp32 contract); A may be float32, bfloat16
or float16 with any strides, so the right-side basis reads A^T as a view.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import register
from . import DEVICE_TYPES

_TWO_PI = 6.283185307179586
_INV_2_23 = 1.1920928955078125e-07  # 2^-23
_MAX_GRID_Y = 65535


@triton.jit
def _philox_normals(seed, blk, stream):
    """The four normals of Philox block ``blk`` (int64 tensor) of ``stream`` (rng.md steps 1-6)."""
    c0 = (blk & 0xFFFFFFFF).to(tl.uint32)
    c1 = (blk >> 32).to(tl.uint32)
    c2 = tl.zeros_like(c0) + stream
    c3 = tl.zeros_like(c0)
    x0, x1, x2, x3 = tl.philox(seed, c0, c1, c2, c3, 10)
    u0 = ((x0 >> 9).to(tl.float32) + 0.5) * _INV_2_23
    u1 = ((x1 >> 9).to(tl.float32) + 0.5) * _INV_2_23
    u2 = ((x2 >> 9).to(tl.float32) + 0.5) * _INV_2_23
    u3 = ((x3 >> 9).to(tl.float32) + 0.5) * _INV_2_23
    r01 = tl.sqrt(-2.0 * tl.log(u0))
    r23 = tl.sqrt(-2.0 * tl.log(u2))
    t01 = _TWO_PI * u1
    t23 = _TWO_PI * u3
    return r01 * tl.cos(t01), r01 * tl.sin(t01), r23 * tl.cos(t23), r23 * tl.sin(t23)


@triton.jit
def _load_a(a_ptrs, j, stride_an, row_ok, N):
    """A[rows, j] as float32 (zero outside the matrix)."""
    return tl.load(a_ptrs + j[None, :] * stride_an, mask=row_ok & (j[None, :] < N), other=0.0).to(tl.float32)


@triton.jit
def _rsvd_sketch_kernel(
    a_ptr,
    y_ptr,
    streams_ptr,
    seed,
    M,
    N,
    K,
    stride_ab,
    stride_am,
    stride_an,
    stride_yb,
    stride_ym,
    stride_yk,
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    QUAD: tl.constexpr,
):
    """Y[b, i, c] = sum_j A[b, i, j] Omega_b[j, c], Omega_b[j, c] = z(seed, streams[b], c N + j)."""
    pid = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    num_c = tl.cdiv(K, BLOCK_C)
    rows = (pid // num_c) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid % num_c) * BLOCK_C + tl.arange(0, BLOCK_C)
    stream = tl.load(streams_ptr + b).to(tl.uint32)
    row_ok = rows[:, None] < M
    a_ptrs = a_ptr + b * stride_ab + rows[:, None] * stride_am
    col_base = cols.to(tl.int64) * N  # flat index of Omega^T[c, 0]
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    if QUAD:
        t = tl.arange(0, BLOCK_R // 4)
        for r0 in range(0, N, BLOCK_R):
            j = (r0 + 4 * t).to(tl.int64)  # j * stride_an may pass 2^31 for a transposed view
            # N % 4 == 0 and r0 % 4 == 0: flat indices c N + j .. c N + j + 3 form one block
            z0, z1, z2, z3 = _philox_normals(seed, (col_base[None, :] + j[:, None]) >> 2, stream)
            acc += tl.dot(_load_a(a_ptrs, j, stride_an, row_ok, N), z0, input_precision="ieee")
            acc += tl.dot(_load_a(a_ptrs, j + 1, stride_an, row_ok, N), z1, input_precision="ieee")
            acc += tl.dot(_load_a(a_ptrs, j + 2, stride_an, row_ok, N), z2, input_precision="ieee")
            acc += tl.dot(_load_a(a_ptrs, j + 3, stride_an, row_ok, N), z3, input_precision="ieee")
    else:
        r = tl.arange(0, BLOCK_R)
        for r0 in range(0, N, BLOCK_R):
            j = (r0 + r).to(tl.int64)
            idx = col_base[None, :] + j[:, None]
            z0, z1, z2, z3 = _philox_normals(seed, idx >> 2, stream)
            lane = idx & 3
            z = tl.where(lane == 0, z0, tl.where(lane == 1, z1, tl.where(lane == 2, z2, z3)))
            acc += tl.dot(_load_a(a_ptrs, j, stride_an, row_ok, N), z, input_precision="ieee")
    y_ptrs = y_ptr + b * stride_yb + rows[:, None] * stride_ym + cols[None, :] * stride_yk
    tl.store(y_ptrs, acc, mask=row_ok & (cols[None, :] < K))


@triton.jit
def _rsvd_omega_kernel(out_ptr, streams_ptr, seed, total, stride_ob, BLOCK: tl.constexpr):
    """out[b, i] = z(seed, streams[b], i) for i < total: Omega_b^T, row-major (k, n), one Philox per 4."""
    blk = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    b = tl.program_id(1).to(tl.int64)
    z0, z1, z2, z3 = _philox_normals(seed, blk, tl.load(streams_ptr + b).to(tl.uint32))
    i = 4 * blk
    base = out_ptr + b * stride_ob + i
    tl.store(base, z0, mask=i < total)
    tl.store(base + 1, z1, mask=i + 1 < total)
    tl.store(base + 2, z2, mask=i + 2 < total)
    tl.store(base + 3, z3, mask=i + 3 < total)


#: "fused": Omega generated inside the GEMM (never stored); "stored": Omega^T generated by one
#: Triton pass into a (B, k, n) buffer, then cuBLAS bmm. Which is faster depends on how the
#: regeneration (once per BLOCK_M rows of A) compares with cuBLAS's GEMM advantage: measured by
#: bench/bench_rsvd.py on the GPU (``--sketch``), not guessed.
SKETCH = "fused"


def sketch_matrix_t(streams: list[int], k: int, n: int, seed: int, device: torch.device) -> torch.Tensor:
    """Triton twin of ``reference.rsvd.sketch_matrix_t``: (len(streams), k, n) float32."""
    out = torch.empty((len(streams), k, n), dtype=torch.float32, device=device)
    total = k * n
    if out.numel() == 0:
        return out
    st = torch.tensor(streams, dtype=torch.int64, device=device)
    block = 256
    for b0 in range(0, len(streams), _MAX_GRID_Y):
        b1 = min(len(streams), b0 + _MAX_GRID_Y)
        grid = (triton.cdiv(triton.cdiv(total, 4), block), b1 - b0)
        _rsvd_omega_kernel[grid](out[b0:b1], st[b0:b1], seed, total, out.stride(0), BLOCK=block)
    return out


@register("rsvd_sketch", "triton", DEVICE_TYPES)
def rsvd_sketch(A: torch.Tensor, k: int, seed: int, streams: list[int]) -> torch.Tensor:
    """Triton implementation of ``lorenza_kernels::rsvd_sketch`` (Y_b = A_b Omega_b, float32)."""
    if SKETCH == "stored":
        return torch.bmm(A.to(torch.float32), sketch_matrix_t(streams, k, A.shape[-1], seed, A.device).mT)
    nb, m, n = A.shape
    y = torch.empty((nb, m, k), dtype=torch.float32, device=A.device)
    if y.numel() == 0:
        return y
    st = torch.tensor(streams, dtype=torch.int64, device=A.device)
    # tl.dot needs every dimension >= 16; 64 x 64 output tiles keep k = 136 (r = 128) at 3 column
    # tiles. Untuned: the GPU measurement (bench/bench_rsvd.py) decides these.
    block_m = 64
    block_c = 64 if k > 32 else max(16, triton.next_power_of_2(k))
    block_r = 64
    for b0 in range(0, nb, _MAX_GRID_Y):  # the batch is grid axis 1 (at most 65535 programs)
        b1 = min(nb, b0 + _MAX_GRID_Y)
        _launch(A[b0:b1], y[b0:b1], st[b0:b1], seed, k, block_m, block_c, block_r)
    return y


def _launch(A, y, st, seed, k, block_m, block_c, block_r) -> None:
    nb, m, n = A.shape
    grid = (triton.cdiv(m, block_m) * triton.cdiv(k, block_c), nb)
    _rsvd_sketch_kernel[grid](
        A,
        y,
        st,
        seed,
        m,
        n,
        k,
        *A.stride(),
        *y.stride(),
        BLOCK_M=block_m,
        BLOCK_C=block_c,
        BLOCK_R=block_r,
        QUAD=n % 4 == 0,
    )
