"""The lorenza-philox-v1 Gaussian stream and the rounding stream in plain torch ops (any device).

This module *defines* the streams every backend must reproduce (see ``docs/rng.md``):

- the Gaussian stream: Philox4x32-10 on the counter ``(b mod 2^32, b >> 32, stream, 0)`` with the
  64-bit seed as key, ``b = i >> 2`` the block of four consecutive elements, uniforms
  ``((x >> 9) + 0.5) * 2^-23`` and Box-Muller on the pairs ``(u0, u1)`` and ``(u2, u3)``;
- the rounding stream (``docs/rng.md``, "The rounding stream"): the word ``x`` of lane ``i & 3`` of
  the counter ``(b mod 2^32, b >> 32, stream, 1)``, the uniform ``u = (x >> 9) 2^-23`` in [0, 1),
  and the unbiased stochastic rounding of a float32 value to bfloat16 or float16 it drives
  (:func:`stochastic_round`).

All integer work is exact: 32-bit words are held in int64 tensors and the 32 x 32 -> 64-bit
products are split into 16-bit halves so that no intermediate exceeds 2^50 (int64 overflow is
never relied upon).
"""

from __future__ import annotations

import math

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
PHILOX_ROUNDS = 10

#: Elements generated per chunk by the reference, to bound its int64 temporaries.
CHUNK = 1 << 21
#: Counter word c3 of each stream: the same (seed, stream) serves both, on disjoint counters.
GAUSSIAN_WORD3 = 0
ROUNDING_WORD3 = 1
#: (fraction bits p, smallest normal exponent e_min) of the dtypes that are rounded stochastically.
SR_FORMATS = {torch.bfloat16: (7, -126), torch.float16: (10, -14)}


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of ``a * m`` for int64 ``a`` in [0, 2^32) and a 32-bit constant."""
    p_lo = a * (m & 0xFFFF)  # < 2^48
    p_hi = a * (m >> 16)  # < 2^48
    mid = p_lo + ((p_hi & 0xFFFF) << 16)  # < 2^49
    return (p_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32_10(
    counter: tuple[torch.Tensor | int, ...], key: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors holding 32-bit words.

    ``counter`` is four words (tensors or ints, broadcast together), ``key`` two ints.
    Returns the four output words as int64 tensors in [0, 2^32).
    """
    ref = next((c for c in counter if isinstance(c, torch.Tensor)), None)
    device = ref.device if ref is not None else None
    c = [
        (w.to(torch.int64) if isinstance(w, torch.Tensor) else torch.tensor(w, dtype=torch.int64, device=device))
        for w in counter
    ]
    k0, k1 = int(key[0]) & MASK32, int(key[1]) & MASK32
    for r in range(PHILOX_ROUNDS):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(c[0], PHILOX_M0)
        hi1, lo1 = _mulhilo(c[2], PHILOX_M1)
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
    return c[0], c[1], c[2], c[3]


def uniform_from_word(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``((x >> 9) + 0.5) * 2^-23``: exact in float32, strictly inside (0, 1)."""
    return ((x >> 9).to(dtype) + 0.5) * (2.0**-23)


def _box_muller(u_a: torch.Tensor, u_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.sqrt(-2.0 * torch.log(u_a))
    theta = (2.0 * math.pi) * u_b
    return r * torch.cos(theta), r * torch.sin(theta)


def gaussian_range(
    start: int,
    stop: int,
    seed: int,
    stream: int,
    *,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Elements ``[start, stop)`` of stream ``(seed, stream)`` as a 1-D tensor of ``compute_dtype``.

    ``compute_dtype=torch.float64`` gives the float64 evaluation of the definition that the
    accuracy contract (1e-5 absolute) is measured against. ``seed`` is taken modulo 2^64.
    """
    seed = int(seed) & ((1 << 64) - 1)
    if stop <= start:
        return torch.empty(0, dtype=compute_dtype, device=device)
    b0, b1 = start >> 2, (stop + 3) >> 2
    blocks = torch.arange(b0, b1, dtype=torch.int64, device=device)
    x = philox4x32_10((blocks & MASK32, blocks >> 32, int(stream), 0), (seed & MASK32, seed >> 32))
    u = [uniform_from_word(w, compute_dtype) for w in x]
    z0, z1 = _box_muller(u[0], u[1])
    z2, z3 = _box_muller(u[2], u[3])
    z = torch.stack((z0, z1, z2, z3), dim=-1).reshape(-1)
    off = start - 4 * b0
    return z[off : off + (stop - start)]


def gaussian_flat(
    numel: int,
    seed: int,
    stream: int,
    *,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The first ``numel`` elements of stream ``(seed, stream)``, generated chunk by chunk."""
    parts = [
        gaussian_range(s, min(s + CHUNK, numel), seed, stream, device=device, compute_dtype=compute_dtype)
        for s in range(0, numel, CHUNK)
    ]
    if not parts:
        return torch.empty(0, dtype=compute_dtype, device=device)
    return torch.cat(parts) if len(parts) > 1 else parts[0]


# --- the rounding stream (docs/rng.md, "The rounding stream") ------------------------------------


def rounding_words(
    start: int, stop: int, seed: int, stream: int, *, device: torch.device | str | None = None
) -> torch.Tensor:
    """The rounding words ``x`` of elements ``[start, stop)`` of stream ``(seed, stream)`` (int64 in
    [0, 2^32)): lane ``i & 3`` of Philox4x32-10 on the counter ``(b mod 2^32, b >> 32, stream, 1)``,
    ``b = i >> 2``. ``seed`` is taken modulo 2^64."""
    seed = int(seed) & ((1 << 64) - 1)
    if stop <= start:
        return torch.empty(0, dtype=torch.int64, device=device)
    b0, b1 = start >> 2, (stop + 3) >> 2
    blocks = torch.arange(b0, b1, dtype=torch.int64, device=device)
    x = philox4x32_10((blocks & MASK32, blocks >> 32, int(stream), ROUNDING_WORD3), (seed & MASK32, seed >> 32))
    words = torch.stack(x, dim=-1).reshape(-1)
    off = start - 4 * b0
    return words[off : off + (stop - start)]


def rounding_uniform(words: torch.Tensor) -> torch.Tensor:
    """``u = (x >> 9) 2^-23``: 23 random bits, exact in float32 and float64, in [0, 1) (0 included)."""
    return (words >> 9).to(torch.float64) * 2.0**-23


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """``2^exponent`` in float64 for int64 exponents in the normal range, built from the bits (exact)."""
    return ((exponent + 1023) << 52).view(torch.float64)


def stochastic_round(v: torch.Tensor, words: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The float32 values ``v`` rounded stochastically to ``dtype`` by the rounding words ``words``.

    The definition of docs/rng.md ("The rounding stream"), step by step, in float64 (where every
    step is exact): with ``p`` fraction bits and smallest normal exponent ``e_min`` of ``dtype``,

        e = floor(log2 |v|)   (v's float32 exponent field)     ulp = 2^(max(e, e_min) - p)
        q = v / ulp   fl = floor(q)   frac = q - fl   r = fl + (u < frac ? 1 : 0)
        result = r ulp, with the sign of v (so -0.0 stays -0.0 and a negative value that rounds to 0 gives -0.0)

    NaN, +-Inf, ``|v| >=`` the largest finite value of ``dtype`` and, for bfloat16, ``|v| < 2^-126``
    are rounded to nearest even instead. float32 is returned unchanged. Unbiased:
    ``E[result] = v`` (exactly when ``frac`` has at most 23 bits, i.e. always except float16
    targets with ``|v| < 2^-24``, where the bias is below 2^-23 ulp).
    """
    if dtype == torch.float32:
        return v
    p, e_min = SR_FORMATS[dtype]
    mag = v.abs()
    rne = ~torch.isfinite(v) | (mag >= torch.finfo(dtype).max)
    if dtype == torch.bfloat16:
        rne |= mag < 2.0**-126
    e = ((v.view(torch.int32) >> 23) & 0xFF).to(torch.int64) - 127
    ulp = _pow2(e.clamp(min=e_min) - p)
    q = v.to(torch.float64) / ulp
    fl = torch.floor(q)
    frac = q - fl
    r = torch.where(rounding_uniform(words) < frac, fl + 1.0, fl)
    out = torch.copysign((r * ulp).to(torch.float32), v)
    return torch.where(rne, v, out).to(dtype)


def stochastic_round_range(src: torch.Tensor, start: int, seed: int, stream: int, dtype: torch.dtype) -> torch.Tensor:
    """``stochastic_round`` of the flat float32 ``src`` taken as elements ``[start, start + numel)``
    of a tensor with rounding stream ``(seed, stream)``, chunk by chunk."""
    src = src.reshape(-1)
    if dtype == torch.float32:
        return src.clone()
    out = torch.empty(src.numel(), dtype=dtype, device=src.device)
    for s in range(0, src.numel(), CHUNK):
        e = min(s + CHUNK, src.numel())
        words = rounding_words(start + s, start + e, seed, stream, device=src.device)
        out[s:e] = stochastic_round(src[s:e], words, dtype)
    return out
