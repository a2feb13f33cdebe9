"""lorenza-philox-v1 (``docs/rng.md``) in Triton: four normals per Philox block, and the rounding
stream's words and stochastic rounding (``docs/rng.md``, "The rounding stream").

Element ``i`` of stream ``(seed, stream)`` comes from Philox block ``b = i >> 2``, lane ``i & 3``:
``tl.philox`` on the counter ``(b mod 2^32, b >> 32, stream, 0)`` with the 64-bit seed as key (it
splits the key as ``(seed mod 2^32, seed >> 32)``, checked against Random123's known answers in the
tests), uniforms ``u = ((x >> 9) + 0.5) 2^-23`` and Box-Muller on the pairs. ``tl.randn`` uses another
counter layout and uniform map, so it is not used.

The transcendental functions are written out here instead of calling ``tl.log``/``tl.sin``/
``tl.cos``, for two reasons. (1) What those lower to differs between Triton releases (libdevice's
precise ``__nv_logf`` in 3.9, a fast ``lg2.approx`` was proposed for ``tl.log``:
https://github.com/triton-lang/triton/pull/4723); an approximate log is not good enough here,
because near u = 1 the radius ``sqrt(-2 ln u)`` is tiny and an absolute error of 1e-7 in the log
becomes 1e-4 in the normal. (2) The angle ``2 pi u`` is a known fraction of a turn, so the range
reduction to a quarter turn is exact integer arithmetic on ``x >> 9``: one reduction serves both
sine and cosine, with no Payne-Hanek path. The polynomials are Cephes' single-precision ones
(S. Moshier, http://www.netlib.org/cephes/, ``single/logf.c`` and ``single/sinf.c``; the same
coefficients as http://gruntthepeon.free.fr/ssemath/sse_mathfun.h), about 1 ulp on their ranges.
Every function is plain float32/int32 arithmetic, so the interpreter (numpy) and the GPU run the
same operations; the accuracy is checked against float64 over every possible uniform.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Elements per program of the test launcher; a multiple of 4 (whole Philox blocks).
GAUSSIAN_BLOCK = 1024


@triton.jit
def neg2_log(u):
    """``-2 ln(u)`` for float32 ``u`` in (0, 1): Cephes ``logf`` (u = m 2^e, m in [sqrt(1/2), sqrt(2)))."""
    bits = u.to(tl.int32, bitcast=True)
    e = (bits >> 23) - 126  # u = m 2^e with m in [0.5, 1); every uniform here is a normal float
    m = ((bits & 0x007FFFFF) | 0x3F000000).to(tl.float32, bitcast=True)
    small = m < 0.70710678118654752
    e = tl.where(small, e - 1, e).to(tl.float32)
    x = tl.where(small, m + m, m) - 1.0  # exact (Sterbenz): keeps full relative accuracy near u = 1
    z = x * x
    p = 7.0376836292e-2 * x - 1.1514610310e-1
    p = p * x + 1.1676998740e-1
    p = p * x - 1.2420140846e-1
    p = p * x + 1.4249322787e-1
    p = p * x - 1.6668057665e-1
    p = p * x + 2.0000714765e-1
    p = p * x - 2.4999993993e-1
    p = p * x + 3.3333331174e-1
    y = p * x * z + e * -2.12194440e-4 - 0.5 * z
    # ln 2 split in two (0.693359375 is exact in 9 bits) so that e ln 2 adds no rounding error.
    return -2.0 * ((x + y) + e * 0.693359375)


@triton.jit
def cos_sin_turns(k):
    """``(cos 2 pi u, sin 2 pi u)`` for ``u = (k + 0.5) 2^-23``, int32 ``k`` in [0, 2^23).

    The nearest quarter turn ``q = round(4u)`` and the remainder ``u - q/4`` (in (-1/8, 1/8) of a
    turn) are computed exactly on the integer ``k``; the polynomials only see |angle| <= pi/4.
    """
    q = (k + (1 << 20)) >> 21  # 0..4; 4u is never exactly a half-integer, so no ties
    d = k - (q << 21)  # in [-2^20, 2^20)
    # angle = (d + 0.5) 2^-23 turns = (d + 0.5) * (2 pi 2^-23) radians; d + 0.5 is exact.
    t = (d.to(tl.float32) + 0.5) * 7.490140565847157e-07
    z = t * t
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * t + t
    c = ((2.443315711809948e-05 * z - 1.388731625493765e-03) * z + 4.166664568298827e-02) * z * z - 0.5 * z + 1.0
    # Rotate by q quarter turns: (cos, sin)(a + q pi/2) = (c, s), (-s, c), (-c, -s), (s, -c).
    swap = (q & 1) != 0
    cq = tl.where(swap, s, c)
    sq = tl.where(swap, c, s)
    cq = tl.where(((q + 1) & 2) != 0, -cq, cq)
    sq = tl.where((q & 2) != 0, -sq, sq)
    return cq, sq


@triton.jit
def box_muller(xa, xb):
    """The two normals ``(r cos 2 pi u_b, r sin 2 pi u_b)``, ``r = sqrt(-2 ln u_a)``, of two uint32 words."""
    ua = ((xa >> 9).to(tl.int32).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # exact
    r = tl.sqrt(neg2_log(ua))
    c, s = cos_sin_turns((xb >> 9).to(tl.int32))
    return r * c, r * s


@triton.jit
def philox_words(seed, block, stream):
    """The four Philox4x32-10 words of the int64 blocks ``block`` (uint64 ``seed``, uint32 ``stream``)."""
    c0 = block.to(tl.uint32)  # low word (truncation)
    c1 = (block >> 32).to(tl.uint32)
    zero = c0 * 0
    return tl.philox(seed, c0, c1, zero + stream, zero)


@triton.jit
def philox_normals(seed, block, stream):
    """``(z[4b], z[4b+1], z[4b+2], z[4b+3])`` for the int64 block indices ``block``."""
    x0, x1, x2, x3 = philox_words(seed, block, stream)
    z0, z1 = box_muller(x0, x1)
    z2, z3 = box_muller(x2, x3)
    return z0, z1, z2, z3


@triton.jit
def normals(seed, first_block, stream, NB: tl.constexpr):
    """The ``4 NB`` consecutive normals from block ``first_block`` on, in flat order."""
    z0, z1, z2, z3 = philox_normals(seed, first_block + tl.arange(0, NB), stream)
    # interleave(interleave(z0, z2), interleave(z1, z3)) = z0[0], z1[0], z2[0], z3[0], z0[1], ...
    return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))


@triton.jit
def normal_at(seed, idx, stream):
    """``z[idx]`` for arbitrary int64 flat indices (one Philox call per element: for unaligned rows)."""
    x0, x1, x2, x3 = philox_words(seed, idx >> 2, stream)
    lane = idx & 3
    second = lane >= 2
    zc, zs = box_muller(tl.where(second, x2, x0), tl.where(second, x3, x1))
    return tl.where((lane & 1) != 0, zs, zc)


# --- the rounding stream (docs/rng.md, "The rounding stream") ------------------------------------


@triton.jit
def rounding_words(seed, first_block, stream, NB: tl.constexpr):
    """The ``4 NB`` rounding words (uint32) of the elements from block ``first_block`` on, in flat
    order: ``tl.philox`` on the counter ``(b mod 2^32, b >> 32, stream, 1)``."""
    block = first_block + tl.arange(0, NB)
    c0 = block.to(tl.uint32)
    c1 = (block >> 32).to(tl.uint32)
    zero = c0 * 0
    x0, x1, x2, x3 = tl.philox(seed, c0, c1, zero + stream, zero + 1)
    return tl.interleave(tl.interleave(x0, x2), tl.interleave(x1, x3))


@triton.jit
def rounding_word_at(seed, idx, stream):
    """The rounding word of arbitrary int64 flat indices (one Philox call per element)."""
    c0 = (idx >> 2).to(tl.uint32)
    c1 = (idx >> 34).to(tl.uint32)
    zero = c0 * 0
    x0, x1, x2, x3 = tl.philox(seed, c0, c1, zero + stream, zero + 1)
    lane = idx & 3
    return tl.where(lane == 0, x0, tl.where(lane == 1, x1, tl.where(lane == 2, x2, x3)))


@triton.jit
def stochastic_round(val, words, DTYPE: tl.constexpr):
    """float32 ``val`` rounded stochastically to ``DTYPE`` (bfloat16 or float16) by the uint32
    rounding ``words``, as a float32 that ``DTYPE`` holds exactly (or ``val`` itself where the
    definition rounds to nearest: the caller's round-to-nearest store finishes both). Integer
    arithmetic only, line for line ``csrc/common/stochastic_round.h``, whose comment derives it
    from the definition: with G = (the k bits of ``|v|`` below the ulp) * 2^(23 - k) and
    X = x >> 9, ``|r|`` grows by one ulp iff X < ceil(G) (v >= 0) or X + floor(G) >= 2^23 (v < 0)."""
    bits = val.to(tl.uint32, bitcast=True)
    sign = bits & 0x80000000
    a = bits & 0x7FFFFFFF
    x = words >> 9
    one = a * 0 + 1
    if DTYPE == tl.bfloat16:
        g = (a & 0xFFFF) << 7
        grow = tl.where(sign != 0, (x + g) >> 23, tl.where(x < g, one, one * 0))
        r = ((a & 0xFFFF0000) + (grow << 16)) | sign
        nearest = (a < 0x00800000) | (a >= 0x7F7F0000)
    else:
        e = a >> 23
        k = tl.where(e >= 113, one * 13, 126 - tl.maximum(e, one))
        tiny = k > 23
        kk = tl.where(tiny, one * 23, k)
        mask = (one << kk) - 1
        g_in = (a & mask) << (23 - kk)
        m = (a & 0x7FFFFF) | tl.where(e > 0, one * 0x800000, one * 0)
        j = tl.where(tiny, tl.minimum(k - 23, one * 31), one)
        g_lo = m >> j
        inexact = tl.where((m & ((one << j) - 1)) != 0, one, one * 0)
        g = tl.where(tiny, g_lo, g_in)
        ceil_g = g + tl.where(tiny, inexact, one * 0)
        grow = tl.where(sign != 0, (x + g) >> 23, tl.where(x < ceil_g, one, one * 0))
        r_in = (a & ~mask) + (grow << kk)
        r = tl.where(tiny, tl.where(grow != 0, one * 0x33800000, one * 0), r_in) | sign
        nearest = a >= 0x477FE000
    return tl.where(nearest, bits, r).to(tl.float32, bitcast=True)


@triton.jit
def _gaussian_kernel(out_ptr, args_ptr, numel, BLOCK: tl.constexpr):
    # The seed, stream and first element travel in a small int64 tensor: as kernel arguments
    # their Triton type (i32/i64/u64) and specialisation would change with the value.
    pid = tl.program_id(0).to(tl.int64)
    seed = tl.load(args_ptr).to(tl.uint64, bitcast=True)
    stream = tl.load(args_ptr + 1).to(tl.uint32)
    first = tl.load(args_ptr + 2)  # a multiple of 4
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    z = normals(seed, (first >> 2) + pid * (BLOCK // 4), stream, BLOCK // 4)
    tl.store(out_ptr + offs, z, mask=offs < numel)


@triton.jit
def _philox_kernel(out_ptr, args_ptr, N: tl.constexpr):
    # args: N rows (c0, c1, c2, c3, key) of int64; key holds the 64 key bits (k1 << 32 | k0).
    row = tl.arange(0, N) * 5
    c0 = tl.load(args_ptr + row).to(tl.uint32)
    c1 = tl.load(args_ptr + row + 1).to(tl.uint32)
    c2 = tl.load(args_ptr + row + 2).to(tl.uint32)
    c3 = tl.load(args_ptr + row + 3).to(tl.uint32)
    key = tl.load(args_ptr + row + 4).to(tl.uint64, bitcast=True)
    x0, x1, x2, x3 = tl.philox(key, c0, c1, c2, c3)
    out = tl.arange(0, N) * 4
    tl.store(out_ptr + out, x0.to(tl.int64))  # uint32 -> int64 zero-extends
    tl.store(out_ptr + out + 1, x1.to(tl.int64))
    tl.store(out_ptr + out + 2, x2.to(tl.int64))
    tl.store(out_ptr + out + 3, x3.to(tl.int64))


def _seed_bits(seed: int) -> int:
    """The 64 bits of a seed in [0, 2^64) as the int64 that stores them."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def gaussian(
    numel: int,
    seed: int,
    stream: int = 0,
    *,
    start: int = 0,
    device: torch.device | str = "cuda",
    block: int = GAUSSIAN_BLOCK,
) -> torch.Tensor:
    """Elements ``[start, start + numel)`` of stream ``(seed, stream)`` as float32 (tests, benchmarks).

    ``seed`` in [0, 2^64), ``stream`` in [0, 2^32), ``start`` a multiple of 4 (a Philox block).
    """
    if start % 4 or start < 0:
        raise ValueError(f"start: must be a non-negative multiple of 4 (a Philox block boundary), got {start}")
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel:
        args = torch.tensor([_seed_bits(seed), stream, start], dtype=torch.int64, device=device)
        _gaussian_kernel[(triton.cdiv(numel, block),)](out, args, numel, BLOCK=block)
    return out


def philox4x32(
    counters: list[tuple[int, int, int, int]], keys: list[tuple[int, int]], *, device: torch.device | str = "cuda"
) -> list[tuple[int, ...]]:
    """Philox4x32-10 words through ``tl.philox``, key ``(k0, k1)`` passed as the seed ``k1 << 32 | k0``."""
    n = len(counters)
    rows = [[*c, _seed_bits(k0 | (k1 << 32))] for c, (k0, k1) in zip(counters, keys)]
    size = triton.next_power_of_2(max(n, 1))
    rows += [[0, 0, 0, 0, 0]] * (size - n)
    args = torch.tensor(rows, dtype=torch.int64, device=device)
    out = torch.empty(size, 4, dtype=torch.int64, device=device)
    _philox_kernel[(1,)](out, args, N=size)
    return [tuple(int(w) for w in r) for r in out[:n].cpu().tolist()]
