"""Triton projected Adam (docs/kernels.md section 2): two GEMMs with fused epilogues, one launch each.

Kernel 1, ``_projected_adam_step_down_kernel``: C = A B is the down-projection R (A = Q^T, B = G
on side "left"; A = G, B = Q on side "right"); its epilogue runs Adam on the tile (M, V updated
in place) and writes the lift coefficient ``X = c_n M / (sqrt(V) / sqrt(bc2) + eps) + lr rs R``
(float32, R's shape: r/m of the parameter). Kernel 2, ``_projected_adam_step_lift_kernel``: the
lift GEMM ``Q X`` (or ``X Q^T``) whose epilogue updates W in place: ``W <- a W + b G + lift(X)``,
``a = 1 - lr wd``, ``b = -lr rs``; with a rounding seed, a bfloat16/float16 W is rounded
stochastically there, the epilogue drawing the rounding words of its tile's elements (flat index
``i = row n + col`` of the layer's ``m x n`` view; four words per Philox call when ``n % 4 == 0``,
else one call per element; ``docs/rng.md``, "The rounding stream"). W and G cross memory once
each (plus G once in kernel 1); no m x n temporary exists. Same formula as
``reference/projected_adam.py``, which is GaLore's unfused form (https://github.com/jiaweizzhao/GaLore).

A batch of same-shape layers goes in ONE launch per kernel (grid axis 1 = layer): the layers'
tensors need not be adjacent, so each kernel takes layer 0's tensors as its pointers plus, per
layer, the element offset of that layer's tensor from layer 0's (plain pointer arithmetic, valid
on every Triton version, no integer-to-pointer casts).

Precision: products are exact and sums float32. Two 16-bit operands of one dtype go to the
tensor cores as they are (bf16 x bf16 products are exact in the fp32 accumulator); float32
operands use ``input_precision="tf32x3"`` (about fp32 accuracy, still on tensor cores). The
float32 coefficient X against a bf16 Q is split into ``hi + lo`` (two bf16 GEMMs, about 16
significant bits, far below the rounding of the parameter); against an fp16 Q the split would
underflow (X is of order lr), so fp16 Q takes the tf32x3 path. The Triton interpreter (tests on
the CPU) computes bf16 dots wrongly (Triton 3.9), so there every dot runs on float32 operands
after the same split; it also rounds float32 -> bf16 toward zero, so bf16 moments may differ from
the reference by one ulp there (round-to-nearest on the GPU; W is stored through
``seeded_ops._round``, which rounds to nearest by hand under the interpreter).

The kernels are plain ``triton.jit`` launched from the function registered for the ``triton``
backend: the op itself is the ``custom_op`` of ``_ops.py`` (opaque to torch.compile, with its
fake), so a ``triton_op`` wrapper would only declare the schema a second time.
Block sizes are a first guess, not tuned on hardware (no autotuning either: both kernels update
tensors in place, so an autotuner's repeated trial runs would corrupt them).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .._registry import register
from .._shapes import matrix_dims
from ..reference.projected_adam import adam_coefficients
from ._common import device_guard, mma
from ._env import DEVICE_TYPES, INTERPRET
from .rng import rounding_word_at, stochastic_round
from .seeded_ops import _round

_LOW = (torch.bfloat16, torch.float16)


@triton.jit
def _projected_adam_step_down_kernel(
    a_ptr, b_ptr, m_ptr, v_ptr, x_ptr, a_off_ptr, b_off_ptr, m_off_ptr, v_off_ptr, coef_ptr,
    P, S, K, stride_ap, stride_ak, stride_bk, stride_bs,
    w1, beta2, one_minus_beta2, eps, c_r,
    LOW_DOT: tl.constexpr, PREC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """R = A B (P x S, reduced over K); M = lerp(M, R, w1), V = beta2 V + (1 - beta2) R^2;
    X = c_n M / (sqrt(V) / sqrt_bc2 + eps) + c_r R, with (c_n, sqrt_bc2) of this layer."""
    pid = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    n_p = tl.cdiv(P, BLOCK_P)
    # The P tiles of one S strip are neighbours in launch order: they read the same B strip
    # (the m x n gradient on side "left") while it is still in L2.
    pid_p = pid % n_p
    pid_s = pid // n_p
    a_ptr += tl.load(a_off_ptr + layer)
    b_ptr += tl.load(b_off_ptr + layer)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_P, BLOCK_S), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(
            a_ptr + offs_p[:, None] * stride_ap + kk[None, :] * stride_ak,
            mask=(offs_p[:, None] < P) & (kk[None, :] < K),
            other=0.0,
        )
        b = tl.load(
            b_ptr + kk[:, None] * stride_bk + offs_s[None, :] * stride_bs,
            mask=(kk[:, None] < K) & (offs_s[None, :] < S),
            other=0.0,
        )
        acc = mma(a, b, acc, LOW_DOT, PREC)

    # Adam epilogue, in the order and rounding of torch.optim.AdamW.
    c_n = tl.load(coef_ptr + 2 * layer)
    sqrt_bc2 = tl.load(coef_ptr + 2 * layer + 1)
    mask = (offs_p[:, None] < P) & (offs_s[None, :] < S)
    idx = offs_p[:, None] * S + offs_s[None, :]
    m_ptr += tl.load(m_off_ptr + layer)
    v_ptr += tl.load(v_off_ptr + layer)
    mom = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    vel = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    diff = acc - mom
    mom = tl.where(w1 < 0.5, mom + w1 * diff, acc - diff * (1.0 - w1))  # torch's lerp
    vel = vel * beta2 + one_minus_beta2 * (acc * acc)
    denom = tl.math.div_rn(tl.math.sqrt_rn(vel), sqrt_bc2) + eps
    x = c_n * tl.math.div_rn(mom, denom) + c_r * acc
    tl.store(m_ptr + idx, mom.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + idx, vel.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(x_ptr + layer * P * S + idx, x, mask=mask)


@triton.jit
def _lift_mma(q, x, acc, X_FIRST: tl.constexpr, SPLIT: tl.constexpr, LOW_DOT: tl.constexpr, PREC: tl.constexpr):
    """acc += q x (or x q): with SPLIT, x (float32) = hi + lo in q's 16-bit dtype, two GEMMs."""
    if SPLIT:
        hi = x.to(q.dtype)
        lo = (x - hi.to(tl.float32)).to(q.dtype)
        if X_FIRST:
            acc = mma(hi, q, acc, LOW_DOT, PREC)
            acc = mma(lo, q, acc, LOW_DOT, PREC)
        else:
            acc = mma(q, hi, acc, LOW_DOT, PREC)
            acc = mma(q, lo, acc, LOW_DOT, PREC)
    else:
        if X_FIRST:
            acc = mma(x, q, acc, False, PREC)
        else:
            acc = mma(q, x, acc, False, PREC)
    return acc


@triton.jit
def _tile_rounding_words(rnd_ptr, layer, offs_m, pid_n, N, BLOCK_N: tl.constexpr, ALIGN4: tl.constexpr):
    """The rounding words of the tile (rows ``offs_m``, columns tile ``pid_n``) of one layer's m x n
    view: stream ``rnd[1 + 2 layer]`` of seed ``rnd[0]``, element ``i`` at index ``rnd[2 + 2 layer] + i``
    (the layer's rounding offset). ALIGN4 (n, BLOCK_N and every offset multiples of 4): every tile
    row starts on a Philox block, four words per call interleaved into flat order."""
    rseed = tl.load(rnd_ptr).to(tl.uint64, bitcast=True)
    rstream = tl.load(rnd_ptr + 1 + 2 * layer).to(tl.uint32)
    roff = tl.load(rnd_ptr + 2 + 2 * layer)
    if ALIGN4:
        first = (roff + offs_m.to(tl.int64) * N + pid_n * BLOCK_N) >> 2
        block = first[:, None] + tl.arange(0, BLOCK_N // 4)[None, :]
        c0 = block.to(tl.uint32)
        c1 = (block >> 32).to(tl.uint32)
        zero = c0 * 0
        x0, x1, x2, x3 = tl.philox(rseed, c0, c1, zero + rstream, zero + 1)
        words = tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        words = rounding_word_at(rseed, roff + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :], rstream)
    return words


@triton.jit
def _projected_adam_step_lift_kernel(
    w_ptr, g_ptr, q_ptr, x_ptr, w_off_ptr, g_off_ptr, q_off_ptr, rnd_ptr,
    M, N, R, stride_qd, stride_qr, stride_xl, a, b,
    LEFT: tl.constexpr, HAS_G: tl.constexpr, SPLIT: tl.constexpr, LOW_DOT: tl.constexpr,
    PREC: tl.constexpr, ROUND: tl.constexpr, ALIGN4: tl.constexpr, RNE_BY_HAND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """W <- a W + b G + Q X (LEFT: Q m x r, X r x n) or + X Q^T (X m x r, Q n x r); W, G m x n.
    ROUND: a 16-bit W is rounded stochastically (``rnd`` = rounding seed, then (stream, offset) per layer)."""
    pid = tl.program_id(0).to(tl.int64)
    layer = tl.program_id(1).to(tl.int64)
    n_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // n_n
    pid_n = pid % n_n
    q_ptr += tl.load(q_off_ptr + layer)
    x_ptr += layer * stride_xl
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, R, BLOCK_K):
        kk = k0 + offs_k
        if LEFT:
            q = tl.load(
                q_ptr + offs_m[:, None] * stride_qd + kk[None, :] * stride_qr,
                mask=(offs_m[:, None] < M) & (kk[None, :] < R),
                other=0.0,
            )
            x = tl.load(
                x_ptr + kk[:, None] * N + offs_n[None, :], mask=(kk[:, None] < R) & (offs_n[None, :] < N), other=0.0
            )
            acc = _lift_mma(q, x, acc, False, SPLIT, LOW_DOT, PREC)
        else:
            x = tl.load(
                x_ptr + offs_m[:, None] * R + kk[None, :], mask=(offs_m[:, None] < M) & (kk[None, :] < R), other=0.0
            )
            q = tl.load(  # Q^T: element (k, j) is Q[j, k]
                q_ptr + offs_n[None, :] * stride_qd + kk[:, None] * stride_qr,
                mask=(kk[:, None] < R) & (offs_n[None, :] < N),
                other=0.0,
            )
            acc = _lift_mma(q, x, acc, True, SPLIT, LOW_DOT, PREC)

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    idx = offs_m[:, None] * N + offs_n[None, :]
    w_ptr += tl.load(w_off_ptr + layer)
    out = a * tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32) + acc
    if HAS_G:
        g_ptr += tl.load(g_off_ptr + layer)
        out += b * tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if ROUND:
        words = _tile_rounding_words(rnd_ptr, layer, offs_m, pid_n, N, BLOCK_N, ALIGN4)
        out = stochastic_round(out, words, w_ptr.dtype.element_ty)  # exact in W's dtype
    tl.store(w_ptr + idx, _round(out, w_ptr.dtype.element_ty, RNE_BY_HAND), mask=mask)


@functools.lru_cache(maxsize=256)
def _device_table(values: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small device tensor of ``values``; cached because it is a pure function of its key
    (the same pointers and steps come back every optimizer step), saving a host-to-device copy."""
    return torch.tensor(values, dtype=dtype, device=device)


def _offsets(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Element offsets of each tensor's data from tensors[0]'s (same dtype: always exact)."""
    base, size = tensors[0].data_ptr(), tensors[0].element_size()
    offs = []
    for t in tensors:
        d = t.data_ptr() - base
        assert d % size == 0, "tensors of one dtype are element-aligned"
        offs.append(d // size)
    return _device_table(tuple(offs), torch.int64, tensors[0].device)


def _blocks(down: bool) -> dict:
    """Tile sizes: small under the interpreter (speed), else a first untuned guess for H100/H200."""
    if INTERPRET:
        return {"BLOCK_P": 16, "BLOCK_S": 32, "BLOCK_K": 16} if down else {"BLOCK_M": 32, "BLOCK_N": 16, "BLOCK_K": 16}
    if down:
        return {"BLOCK_P": 64, "BLOCK_S": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3}


@register("projected_adam_step_", "triton", DEVICE_TYPES)
def projected_adam_step_(params, *args, **kwargs) -> None:
    """Both launches on the tensors' device (Triton launches on the current one)."""
    if not params:
        return
    with device_guard(params[0].device):
        _projected_adam_step(params, *args, **kwargs)


def _projected_adam_step(
    params, grads, projs, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, scale, side,
    residual_scale, rounding_seed=None, rounding_streams=None, rounding_offsets=None,
) -> None:  # fmt: skip
    m, n = matrix_dims(params[0])
    if m * n == 0:  # then the moments are empty too: nothing to update
        return
    if len({q.stride() for q in projs}) > 1:  # one launch needs one set of strides
        projs = [q.contiguous() for q in projs]
    q0, g0 = projs[0], grads[0]
    r = q0.shape[1]
    left = side == "left"
    layers = len(params)
    dev = params[0].device
    prec = "tf32x3"
    # Kernel 1: R = Q^T G (r x n, reduce over m) or G Q (m x r, reduce over n).
    P, S, K = (r, n, m) if left else (m, r, n)
    if left:
        a_t, b_t, sa, sb = projs, grads, (q0.stride(1), q0.stride(0)), (n, 1)
    else:
        a_t, b_t, sa, sb = grads, projs, (n, 1), (q0.stride(0), q0.stride(1))
    low = not INTERPRET and a_t[0].dtype == b_t[0].dtype and a_t[0].dtype in _LOW
    coef = _device_table(
        tuple(c for s in steps for c in adam_coefficients(s, lr, beta1, beta2, scale)), torch.float32, dev
    )
    x = torch.empty(layers, P, S, dtype=torch.float32, device=dev)  # the lift coefficients
    cfg = _blocks(True)
    grid = (triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(S, cfg["BLOCK_S"]), layers)
    _projected_adam_step_down_kernel[grid](
        a_t[0], b_t[0], exp_avgs[0], exp_avg_sqs[0], x,
        _offsets(a_t), _offsets(b_t), _offsets(exp_avgs), _offsets(exp_avg_sqs), coef,
        P, S, K, *sa, *sb, 1.0 - beta1, beta2, 1.0 - beta2, eps, lr * residual_scale,
        LOW_DOT=low, PREC=prec, **cfg,
    )  # fmt: skip
    # Kernel 2: W <- a W + b G + lift(X), stochastically rounded with a rounding seed (16-bit W).
    split = q0.dtype == torch.bfloat16
    cfg = _blocks(False)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), layers)
    round_w = rounding_seed is not None and params[0].dtype in _LOW
    roffs = list(rounding_offsets) if rounding_offsets is not None else [0] * layers
    pairs = tuple(v for so in zip(rounding_streams, roffs) for v in so) if round_w else ()
    rnd = _device_table((rounding_seed, *pairs) if round_w else (0,), torch.int64, dev)
    _projected_adam_step_lift_kernel[grid](
        params[0], g0, q0, x, _offsets(params), _offsets(grads), _offsets(projs), rnd,
        m, n, r, q0.stride(0), q0.stride(1), P * S, 1.0 - lr * weight_decay, -lr * residual_scale,
        LEFT=left, HAS_G=residual_scale != 0.0, SPLIT=split, LOW_DOT=split and not INTERPRET, PREC=prec,
        ROUND=round_w, ALIGN4=n % 4 == 0 and cfg["BLOCK_N"] % 4 == 0 and all(o % 4 == 0 for o in roffs),
        RNE_BY_HAND=INTERPRET, **cfg,
    )  # fmt: skip
