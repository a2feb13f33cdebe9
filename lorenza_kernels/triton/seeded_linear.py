"""Triton seeded linear layer (docs/kernels.md section 4): ``y = x W'^T + b'``, the noise made in the GEMM.

``W' = round(float32(W) + alpha z_W)`` with ``z_W[i] = z(seed, weight_stream, i)`` over W's flat
row-major index (``reference/seeded_linear.py``, ``docs/rng.md``). W' is never stored: each program
owns a (BLOCK_M x BLOCK_N) tile of y, and in every step of its K loop loads the (BLOCK_N x BLOCK_K)
tile of W it needs, regenerates the matching tile of z with the accurate normals of
``triton/rng.py``, forms W' in float32, rounds it to W's dtype (one rounding, to nearest even, as
``seeded_axpby_`` writes it) and feeds it to ``tl.dot``. The bias gets the same treatment in the
epilogue (its own stream, once per program). No weight-sized temporary, no extra pass over W.

Philox yields four normals per call for four consecutive flat indices. When ``in % 4 == 0`` every
row of W starts on a Philox block and a K step (``BLOCK_K % 4 == 0``) covers whole blocks: one call
per four elements, the four lanes interleaved into row order (as ``_seeded_colsum_kernel`` does).
Otherwise the lanes straddle rows and each element makes its own call (``normal_at``: four times the
Philox work; LLM weights never take this path).

The tile of z is regenerated once per BLOCK_M rows of x, i.e. ``ceil(M / BLOCK_M)`` times per
weight element. Its arithmetic (some 40-50 instructions per element: a quarter of a Philox4x32-10
call, half a Box-Muller pair, the update and its rounding) is expected to cost more than the tile's
MMAs (``2 BLOCK_M`` FLOPs per weight element, on tensor cores), so BLOCK_M is as large as the batch
and the registers allow (256 for 16-bit operands, 128 for float32). Not measured on a GPU yet.

Precision: products exact, sums float32. 16-bit operands (x and the rounded W') go to the tensor
cores as they are (bf16 x bf16 and fp16 x fp16 products are exact in the float32 accumulator).
float32 uses ``input_precision="tf32x3"``: each operand split into two tf32 parts, three MMAs,
about float32 accuracy (relative error per product ~2^-21, within the worst-case float32 rounding
of a sum of K >= 8 terms) on tensor cores; "ieee" would run on the FMA units at about 40 % of that
rate (H100: 67 TFLOP/s of float32 FMA against 495 / 3 for three TF32 MMAs). torch's float32
``F.linear`` (``allow_tf32`` off by default) is the reference it must match; TF32 alone (10-bit
operands) would not.
The interpreter (tests on the CPU) computes bf16 dots wrongly (Triton 3.9), so there both operands
go to the dot as float32 (same exact products); it also truncates float32 -> bf16, so the roundings
are done on the bits there (``triton/seeded_ops.py``'s ``_round``).

Tiles depend only on the shapes and the dtype (no autotuning, no query of the GPU), so results are
bitwise reproducible from run to run on one GPU model; the block sizes are a first guess for
H100/H200.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._registry import register
from ._common import device_guard, mma
from ._env import DEVICE_TYPES, INTERPRET
from .rng import normal_at, normals, philox_normals
from .seeded_ops import _round

#: A first guess of the number of programs that fills an H100/H200 (132 SMs, 2 programs each);
#: a constant, not the device's SM count, so that the tiles (and the results) depend on shapes only.
_FILL = 264
#: float32 operands: "tf32x3" (about float32 accuracy on tensor cores, see the module docstring).
FP32_PRECISION = "tf32x3"


@triton.jit(do_not_specialize=["seed", "w_stream", "b_stream"])
def _seeded_linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    seed, w_stream, b_stream, alpha,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, QUAD: tl.constexpr, LOW_DOT: tl.constexpr, PREC: tl.constexpr,
    RNE_BY_HAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    """y[m, n] = sum_k x[m, k] W'[n, k] + b'[n], W'[n, k] = round(W[n, k] + alpha z(seed, w_stream, n K + k))."""
    DTYPE: tl.constexpr = w_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    # Groups of GROUP_M row tiles walk the column tiles together: neighbouring programs share the
    # x rows (and one W tile while it is in L2).
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    # The seed arrives as the int64 of its 64 bits (an i32 when small: sign-extended first), the
    # streams as non-negative ints below 2^32.
    key = seed.to(tl.int64).to(tl.uint64, bitcast=True)
    ws = w_stream.to(tl.int64).to(tl.uint32)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features: rows of W
    row_ok = rows < M
    col_ok = cols < N
    x_rows = x_ptr + rows[:, None] * stride_xm
    w_rows = w_ptr + cols[:, None] * stride_wn
    flat0 = cols * K  # flat index of W[n, 0]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # kk * stride may pass 2^31 (a transposed view)
        k_ok = kk < K
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_ok = col_ok[:, None] & k_ok[None, :]
        w = tl.load(w_rows + kk[None, :] * stride_wk, mask=w_ok, other=0.0)
        if QUAD:
            # K % 4 == 0 and k0 % 4 == 0: flat indices n K + k0 + 4t .. + 3 form Philox block
            # (n K + k0) / 4 + t; the four lanes interleave back into row order.
            blocks = ((flat0 + k0) >> 2)[:, None] + tl.arange(0, BLOCK_K // 4)[None, :]
            z0, z1, z2, z3 = philox_normals(key, blocks, ws)
            z = tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))
        else:
            z = normal_at(key, flat0[:, None] + kk[None, :], ws)
        # Outside W the tile is zero, not round(alpha z) (which may overflow a 16-bit dtype: 0 * Inf).
        wp = _round(tl.where(w_ok, w.to(tl.float32) + alpha * z, 0.0), DTYPE, RNE_BY_HAND)
        acc = mma(x, tl.trans(wp), acc, LOW_DOT, PREC)
    if HAS_BIAS:
        # b'[n] = round(b[n] + alpha z(seed, b_stream, n)); the tile starts on a Philox block.
        b = tl.load(b_ptr + cols * stride_b, mask=col_ok, other=0.0)
        zb = normals(key, (pid_n * BLOCK_N) >> 2, b_stream.to(tl.int64).to(tl.uint32), BLOCK_N // 4)
        acc += _round(b.to(tl.float32) + alpha * zb, DTYPE, RNE_BY_HAND).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, _round(acc, DTYPE, RNE_BY_HAND), mask=row_ok[:, None] & col_ok[None, :])


def config(M: int, N: int, K: int, dtype: torch.dtype) -> dict:
    """Tile sizes and launch options: small under the interpreter (speed), else a first, untuned
    guess for H100/H200 that depends on the shapes and the dtype only.

    Registers bound the choice: the W tile's noise is computed in registers, about
    ``BLOCK_N BLOCK_K / threads`` elements per thread, kept at about four. Compiled for sm_90 with
    Triton 3.9 (``triton.compile`` and its ptxas, no GPU run), the ``in % 4 == 0`` path: 256x64x16
    with 8 warps takes 228 registers for 16-bit operands (float32 128x64x16: 178), the small-M
    tiles 66-218, none spills; 256x64x32 or 128x128x32 tiles spill.
    """
    if INTERPRET:
        return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
    low = dtype != torch.float32
    if M > 128:
        # The W tile's noise is made once per BLOCK_M rows of x: as many rows as registers allow.
        bm, bn = (256 if low else 128), 64
    else:
        bm, bn = max(16, triton.next_power_of_2(M)), 64
        # One row of tiles (decoding, small probes): narrower column tiles to fill the GPU.
        while bn > 16 and triton.cdiv(N, bn) < _FILL:
            bn //= 2
    warps = 8 if bm * bn >= 128 * 64 else 4
    # About four noise elements (one Philox call) per thread and K step.
    bk = max(16, min(64, 4 * 32 * warps // bn))
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": 3}


@register("seeded_linear", "triton", DEVICE_TYPES)
def seeded_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seed: int,
    weight_stream: int,
    bias_stream: int,
    alpha: float,
) -> torch.Tensor:
    """Triton implementation of ``lorenza_kernels::seeded_linear`` (arguments already validated)."""
    N, K = weight.shape
    lead = tuple(x.shape[:-1])
    M = 1
    for s in lead:
        M *= s
    # One (M, K) view with any strides when the leading dims merge; otherwise reshape copies x.
    x2 = x.reshape(M, K)
    y = torch.empty((M, N), dtype=weight.dtype, device=weight.device)
    if M == 0 or N == 0:
        return y.view(*lead, N)
    cfg = config(M, N, K, weight.dtype)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    has_bias = bias is not None
    with device_guard(weight.device):
        _seeded_linear_kernel[grid](
            x2, weight, bias if has_bias else weight, y,
            seed, weight_stream, bias_stream if has_bias else 0, alpha,
            M, N, K,
            x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), bias.stride(0) if has_bias else 0,
            y.stride(0), y.stride(1),
            HAS_BIAS=has_bias, QUAD=K % 4 == 0, LOW_DOT=weight.dtype != torch.float32 and not INTERPRET,
            PREC=FP32_PRECISION, RNE_BY_HAND=INTERPRET, **cfg,
        )  # fmt: skip
    return y.view(*lead, N)
