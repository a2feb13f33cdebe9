// The lorenza-philox-v1 Gaussian stream (docs/rng.md) on the CPU, a tile of 16 Philox
// blocks (64 consecutive elements) at a time, torch-free.
//
// Why the split between intrinsics and plain loops: Philox needs 32 x 32 -> 64-bit products.
// gcc vectorizes `(uint64_t)a * b` either as a full 64 x 64 emulation (three pmuludq per product)
// or as vpmullq (slow on Intel), so the integer part is written with pmuludq intrinsics per ISA,
// keeping each 32-bit word in a 64-bit lane so that one pmuludq gives hi and lo without shuffles
// (the lane's upper half may hold garbage: pmuludq reads only the low half, and only the low half
// is stored). Everything else (uniforms, log, sincos, Box-Muller, dtype conversions) is plain C++
// written so that gcc vectorizes it for whatever target the caller was compiled for: the kernels
// in seeded_ops.cpp are instantiated once per ISA inside target-attributed functions.
//
// The transcendentals are polynomial approximations, accurate to a few float32 ulps, so that the
// loops need no libm call: every z stays within ~1e-6 of a float64 evaluation (contract: 1e-5).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/philox.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LORENZA_CPU_X86 1
#define LORENZA_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LORENZA_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c")))
#endif

#define LORENZA_CPU_INLINE inline __attribute__((always_inline))

namespace lorenza {
namespace cpu {

constexpr int kTileBlocks = 16;           // Philox blocks per tile
constexpr int kTile = 4 * kTileBlocks;    // elements per tile
constexpr int kPairs = 2 * kTileBlocks;   // Box-Muller pairs per tile

// Key and the fixed counter words of one stream: c2 = stream, c3 = word3 (0 for the Gaussian
// stream, 1 for the rounding stream of docs/rng.md; disjoint counters under one seed).
struct StreamKey {
  uint32_t k0, k1, stream, word3;
};

LORENZA_CPU_INLINE StreamKey make_key(uint64_t seed, uint32_t stream, uint32_t word3 = 0u) {
  return StreamKey{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32), stream, word3};
}

// Philox words of blocks b0 .. b0 + 15 in Box-Muller pair order: pair p = 2j + h of block b0 + j
// has radius[p] = word 2h (fed to the log) and angle[p] = word 2h + 1 (fed to the sincos), and
// gives elements 2p (r cos) and 2p + 1 (r sin). Storing words 0 and 2 interleaved is free in the
// 64-bit-lane layout (each lane stored as word 0 | word 2 << 32), leaving only a 2-way interleave
// of the floats instead of a 4-way one.
struct PhiloxTile {
  alignas(64) uint32_t radius[kPairs];
  alignas(64) uint32_t angle[kPairs];
};

// Portable fallback (non-x86 builds): the scalar Philox of philox.h, block by block.
inline void philox_tile_scalar(const StreamKey& key, uint64_t b0, PhiloxTile& w) {
  for (int j = 0; j < kTileBlocks; ++j) {
    const uint64_t b = b0 + j;
    const Philox4 x = philox4x32_10(static_cast<uint32_t>(b), static_cast<uint32_t>(b >> 32), key.stream,
                                    key.word3, key.k0, key.k1);
    w.radius[2 * j] = x.x[0];
    w.angle[2 * j] = x.x[1];
    w.radius[2 * j + 1] = x.x[2];
    w.angle[2 * j + 1] = x.x[3];
  }
}

#ifdef LORENZA_CPU_X86
// The ten Philox rounds on arrays c0..c3 of V integer vectors of 64-bit lanes, written once for
// the three ISAs, which pass their own multiply / shift / xor / broadcast intrinsics. Each
// philox_tile_* is a noinline function compiled for its ISA (one call per 64 elements), so the
// generic callers in seeded_ops.cpp need no target attribute to call it.
#define LORENZA_PHILOX_ROUNDS(V, MUL, SRL32, XOR, SET1)                          \
  uint32_t k0 = key.k0, k1 = key.k1;                                             \
  for (int r = 0; r < kPhiloxRounds; ++r) {                                      \
    const auto kk0 = SET1(static_cast<long long>(k0));                           \
    const auto kk1 = SET1(static_cast<long long>(k1));                           \
    for (int v = 0; v < V; ++v) {                                                \
      const auto p0 = MUL(c0[v], m0);                                            \
      const auto p1 = MUL(c2[v], m1);                                            \
      c0[v] = XOR(XOR(SRL32(p1), c1[v]), kk0);                                   \
      c2[v] = XOR(XOR(SRL32(p0), c3[v]), kk1);                                   \
      c1[v] = p1;                                                                \
      c3[v] = p0;                                                                \
    }                                                                            \
    k0 += kPhiloxW0;                                                             \
    k1 += kPhiloxW1;                                                             \
  }

LORENZA_CPU_INLINE __m128i srl32_128(__m128i x) { return _mm_srli_epi64(x, 32); }

// x86-64 baseline (SSE2): two blocks per vector, the tile in two halves of 8 blocks (16 xmm
// registers: all 16 blocks at once would spill).
__attribute__((noinline)) inline void philox_tile_sse2(const StreamKey& key, uint64_t b0, PhiloxTile& w) {
  constexpr int V = 4;
  const __m128i m0 = _mm_set1_epi64x(kPhiloxM0), m1 = _mm_set1_epi64x(kPhiloxM1);
  for (int half = 0; half < kTileBlocks; half += 2 * V) {
    __m128i c0[V], c1[V], c2[V], c3[V];
    for (int v = 0; v < V; ++v) {
      const uint64_t b = b0 + half + 2 * v;
      c0[v] = _mm_set_epi64x(static_cast<long long>(b + 1), static_cast<long long>(b));
      c1[v] = _mm_srli_epi64(c0[v], 32);
      c2[v] = _mm_set1_epi64x(key.stream);
      c3[v] = _mm_set1_epi64x(key.word3);
    }
    LORENZA_PHILOX_ROUNDS(V, _mm_mul_epu32, srl32_128, _mm_xor_si128, _mm_set1_epi64x)
    const __m128i lo = _mm_set1_epi64x(0xFFFFFFFFLL);
#define LORENZA_STORE(dst, a, b) \
  _mm_store_si128(reinterpret_cast<__m128i*>(dst), _mm_or_si128(_mm_and_si128(a, lo), _mm_slli_epi64(b, 32)))
    for (int v = 0; v < V; ++v) {
      LORENZA_STORE(w.radius + 2 * (half + 2 * v), c0[v], c2[v]);
      LORENZA_STORE(w.angle + 2 * (half + 2 * v), c1[v], c3[v]);
    }
#undef LORENZA_STORE
  }
}

LORENZA_TARGET_AVX2 LORENZA_CPU_INLINE __m256i srl32_256(__m256i x) { return _mm256_srli_epi64(x, 32); }

// AVX2: four blocks per vector.
LORENZA_TARGET_AVX2 __attribute__((noinline)) inline void philox_tile_avx2(const StreamKey& key, uint64_t b0,
                                                                           PhiloxTile& w) {
  constexpr int V = kTileBlocks / 4;
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i lane = _mm256_setr_epi64x(0, 1, 2, 3);
  __m256i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    c0[v] = _mm256_add_epi64(_mm256_set1_epi64x(static_cast<long long>(b0 + 4 * v)), lane);
    c1[v] = _mm256_srli_epi64(c0[v], 32);
    c2[v] = _mm256_set1_epi64x(key.stream);
    c3[v] = _mm256_set1_epi64x(key.word3);
  }
  LORENZA_PHILOX_ROUNDS(V, _mm256_mul_epu32, srl32_256, _mm256_xor_si256, _mm256_set1_epi64x)
#define LORENZA_STORE(dst, a, b) \
  _mm256_store_si256(reinterpret_cast<__m256i*>(dst), _mm256_blend_epi32(a, _mm256_slli_epi64(b, 32), 0xAA))
  for (int v = 0; v < V; ++v) {
    LORENZA_STORE(w.radius + 8 * v, c0[v], c2[v]);
    LORENZA_STORE(w.angle + 8 * v, c1[v], c3[v]);
  }
#undef LORENZA_STORE
}

// gcc 12's avx512fintrin.h trips -Wuninitialized on its own _mm512_undefined_* (gcc bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
LORENZA_TARGET_AVX512 LORENZA_CPU_INLINE __m512i srl32_512(__m512i x) { return _mm512_srli_epi64(x, 32); }

// AVX-512F: eight blocks per vector.
LORENZA_TARGET_AVX512 __attribute__((noinline)) inline void philox_tile_avx512(const StreamKey& key, uint64_t b0,
                                                                               PhiloxTile& w) {
  constexpr int V = kTileBlocks / 8;
  const __m512i m0 = _mm512_set1_epi64(kPhiloxM0), m1 = _mm512_set1_epi64(kPhiloxM1);
  const __m512i lane = _mm512_setr_epi64(0, 1, 2, 3, 4, 5, 6, 7);
  __m512i c0[V], c1[V], c2[V], c3[V];
  for (int v = 0; v < V; ++v) {
    c0[v] = _mm512_add_epi64(_mm512_set1_epi64(static_cast<long long>(b0 + 8 * v)), lane);
    c1[v] = _mm512_srli_epi64(c0[v], 32);
    c2[v] = _mm512_set1_epi64(key.stream);
    c3[v] = _mm512_set1_epi64(key.word3);
  }
  LORENZA_PHILOX_ROUNDS(V, _mm512_mul_epu32, srl32_512, _mm512_xor_si512, _mm512_set1_epi64)
#define LORENZA_STORE(dst, a, b) \
  _mm512_store_si512(dst, _mm512_mask_blend_epi32(0xAAAA, a, _mm512_slli_epi64(b, 32)))
  for (int v = 0; v < V; ++v) {
    LORENZA_STORE(w.radius + 16 * v, c0[v], c2[v]);
    LORENZA_STORE(w.angle + 16 * v, c1[v], c3[v]);
  }
#undef LORENZA_STORE
}
#pragma GCC diagnostic pop
#undef LORENZA_PHILOX_ROUNDS
#endif  // LORENZA_CPU_X86

// --- float32 part: vectorizable by the caller's target ------------------------------------------

LORENZA_CPU_INLINE float as_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

LORENZA_CPU_INLINE uint32_t as_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// c ? a : b on bits, as data flow: gcc sinks a float operation that feeds only one side of a ?:
// into a branch, and then (under its default -ftrapping-math) will not if-convert it, so the loop
// is not vectorized without AVX-512 masking.
LORENZA_CPU_INLINE uint32_t select_bits(bool c, uint32_t a, uint32_t b) {
  return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(c)));
}

// docs/rng.md step 5; x >> 9 < 2^23 converts exactly through int32 (cheaper than uint32 on x86).
LORENZA_CPU_INLINE float uniform_of(uint32_t x) {
  return (static_cast<float>(static_cast<int32_t>(x >> 9)) + 0.5f) * 1.1920928955078125e-7f;
}

// -2 ln(u) for u in (0, 1) (u is normal, never 0, Inf or NaN, so no special cases).
// Range reduction u = m 2^e with m in [sqrt(1/2), sqrt(2)), then ln(1 + x) = x - x^2/2 + x^3 P(x)
// and e ln 2 split in two parts; the polynomial is Cephes logf's
// (https://www.netlib.org/cephes/, single/logf.c), about 1 ulp on that interval.
LORENZA_CPU_INLINE float minus_two_log(float u) {
  // m in [sqrt(1/2), sqrt(2)) from the bits: the mantissa gets exponent 0 or -1 depending on an
  // integer compare (m < c ? 2m - 1 : m - 1 on floats would not vectorize, see select_bits).
  const uint32_t bits = as_bits(u);
  const uint32_t mant = bits & 0x007FFFFFu;
  const uint32_t low = mant < 0x003504F3u ? 1u : 0u;                  // mantissa below sqrt(1/2)'s
  const float x = as_float(mant | (0x3F000000u + (low << 23))) - 1.0f;  // exact (Sterbenz)
  const float fe = static_cast<float>(static_cast<int32_t>(bits >> 23) - 126 - static_cast<int32_t>(low));
  const float z = x * x;
  float p = 7.0376836292e-2f;
  p = p * x - 1.1514610310e-1f;
  p = p * x + 1.1676998740e-1f;
  p = p * x - 1.2420140846e-1f;
  p = p * x + 1.4249322787e-1f;
  p = p * x - 1.6668057665e-1f;
  p = p * x + 2.0000714765e-1f;
  p = p * x - 2.4999993993e-1f;
  p = p * x + 3.3333331174e-1f;
  float y = x * z * p - 2.12194440e-4f * fe - 0.5f * z;
  y = (x + y) + 0.693359375f * fe;
  return -2.0f * y;
}

// sin(2 pi u), cos(2 pi u) for u in (0, 1). The reduction is exact, done on u rather than on the
// angle: q = round(4u), f = u - q/4 in [-1/8, 1/8] (exact: u is a multiple of 2^-24), so
// 2 pi u = q pi/2 + 2 pi f and only the final 2 pi f product rounds (|theta| <= pi/4).
// Polynomials as in Cephes sinf/cosf (https://www.netlib.org/cephes/, single/sinf.c).
LORENZA_CPU_INLINE void sincos_2pi(float u, float& s_out, float& c_out) {
  const int32_t q = static_cast<int32_t>(4.0f * u + 0.5f);  // u > 0: truncation is floor
  const float f = u - static_cast<float>(q) * 0.25f;
  const float t = f * 6.28318530717958648f;
  const float z = t * t;
  const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * t + t;
  const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                  0.5f * z + 1.0f;
  // quadrant q mod 4: (sin, cos) = (s, c), (c, -s), (-s, -c), (-c, s)
  const bool swap = (q & 1) != 0;
  const uint32_t s_sign = static_cast<uint32_t>(q & 2) << 30;
  const uint32_t c_sign = static_cast<uint32_t>((q + 1) & 2) << 30;
  s_out = as_float(select_bits(swap, as_bits(c), as_bits(s)) ^ s_sign);
  c_out = as_float(select_bits(swap, as_bits(s), as_bits(c)) ^ c_sign);
}

// x[0 .. 64) = the Philox words of elements 4 b0 .. 4 b0 + 63 in flat order (word i & 3 of block
// i >> 2): the rounding words when key.word3 == 1 (docs/rng.md, "The rounding stream").
template <void (*Philox)(const StreamKey&, uint64_t, PhiloxTile&)>
LORENZA_CPU_INLINE void word_tile(const StreamKey& key, uint64_t b0, uint32_t* __restrict x) {
  PhiloxTile w;
  Philox(key, b0, w);
  // element 2p + t is word 2 (p mod 2) + t of block p / 2: radius[p] for t = 0, angle[p] for t = 1
  for (int p = 0; p < kPairs; ++p) {
    x[2 * p] = w.radius[p];
    x[2 * p + 1] = w.angle[p];
  }
}

// z[0 .. 64) = elements 4 b0 .. 4 b0 + 63 of the stream; `Philox` is one of philox_tile_*.
template <void (*Philox)(const StreamKey&, uint64_t, PhiloxTile&)>
LORENZA_CPU_INLINE void gaussian_tile(const StreamKey& key, uint64_t b0, float* __restrict z) {
  PhiloxTile w;
  Philox(key, b0, w);
  for (int p = 0; p < kPairs; ++p) {
    const float r = std::sqrt(minus_two_log(uniform_of(w.radius[p])));
    float s, c;
    sincos_2pi(uniform_of(w.angle[p]), s, c);
    z[2 * p] = r * c;
    z[2 * p + 1] = r * s;
  }
}

}  // namespace cpu
}  // namespace lorenza
