// float32 <-> bfloat16 / float16 conversions written branch-free, so that gcc vectorizes the loops
// that use them (branching conversions do not, and a `_Float16` cast stays one scalar vcvtps2ph
// per element even with F16C). Round to nearest even, as torch does; Inf stays Inf,
// NaN stays NaN (quiet), subnormals are exact.
// Where a candidate needs a float operation the choice is made with select_bits, not ?: (see there).
#pragma once
#include <cstdint>

#include "common/dtype.h"
#include "common/stochastic_round.h"
#include "cpu/gaussian_tile.h"  // as_float, as_bits, select_bits, LORENZA_CPU_INLINE

namespace lorenza {
namespace cpu {

LORENZA_CPU_INLINE float bf16_bits_to_float(uint16_t h) { return as_float(static_cast<uint32_t>(h) << 16); }

LORENZA_CPU_INLINE uint16_t float_to_bf16_bits(float f) {
  const uint32_t b = as_bits(f);
  const uint32_t rounded = (b + 0x7FFFu + ((b >> 16) & 1u)) >> 16;
  const uint32_t nan = (b >> 16) | 0x40u;  // a quiet NaN, as torch's conversion
  return static_cast<uint16_t>((b & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

// The approach (rebias + round on the bits for normals, an FPU add that aligns the mantissa for
// subnormals) follows https://gist.github.com/rygorous/2156668 (F. Giesen, float_to_half_fast3_rtne).
LORENZA_CPU_INLINE uint16_t float_to_half_bits(float f) {
  const uint32_t b = as_bits(f);
  const uint32_t sign = (b >> 16) & 0x8000u;
  const uint32_t a = b & 0x7FFFFFFFu;
  // normal halves, a in [2^-14, 65520): rebias the exponent (127 -> 15), round away 13 bits;
  // a carry out of the mantissa bumps the exponent, up to 0x7C00 (Inf) from 65520 on.
  const uint32_t normal = (a - ((127u - 15u) << 23) + 0xFFFu + ((a >> 13) & 1u)) >> 13;
  // a < 2^-14: 0.5f has ulp 2^-24, the half subnormal step, so the sum's low bits are the result.
  const uint32_t sub = as_bits(as_float(a) + 0.5f) - 0x3F000000u;
  const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN : overflow or Inf
  const uint32_t h = select_bits(a >= 0x47800000u, big, select_bits(a < 0x38800000u, sub, normal));
  return static_cast<uint16_t>(h | sign);
}

LORENZA_CPU_INLINE float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = h & 0x7C00u;
  const uint32_t body = static_cast<uint32_t>(h & 0x7FFFu) << 13;
  const uint32_t normal = body + ((127u - 15u) << 23);
  const uint32_t big = body | 0x7F800000u;  // Inf, NaN (payload kept)
  // subnormal or zero: m 2^-24 = (0.5 + m 2^-24) - 0.5, exact
  const uint32_t sub = as_bits(as_float(0x3F000000u + (h & 0x3FFu)) - 0.5f);
  const uint32_t bits = select_bits(e == 0x7C00u, big, select_bits(e == 0, sub, normal));
  return as_float(bits | sign);
}

// Element access by dtype: storage type, the two conversions, and the stochastically rounded store
// (docs/rng.md, "The rounding stream": `word` is the element's rounding word; the rounded value is
// exact in the dtype, so the round-to-nearest conversion stores it unchanged). float32 is never
// rounded: its store_sr is the plain store.
struct F32 {
  using storage = float;
  static constexpr bool kLow = false;
  static LORENZA_CPU_INLINE float load(float x) { return x; }
  static LORENZA_CPU_INLINE float store(float x) { return x; }
  static LORENZA_CPU_INLINE float store_sr(float x, uint32_t) { return x; }
};

struct BF16 {
  using storage = uint16_t;
  static constexpr bool kLow = true;
  static LORENZA_CPU_INLINE float load(uint16_t x) { return bf16_bits_to_float(x); }
  static LORENZA_CPU_INLINE uint16_t store(float x) { return float_to_bf16_bits(x); }
  static LORENZA_CPU_INLINE uint16_t store_sr(float x, uint32_t word) {
    return float_to_bf16_bits(as_float(stochastic_round_bf16_bits(as_bits(x), word)));
  }
};

struct F16 {
  using storage = uint16_t;
  static constexpr bool kLow = true;
  static LORENZA_CPU_INLINE float load(uint16_t x) { return half_bits_to_float(x); }
  static LORENZA_CPU_INLINE uint16_t store(float x) { return float_to_half_bits(x); }
  static LORENZA_CPU_INLINE uint16_t store_sr(float x, uint32_t word) {
    return float_to_half_bits(as_float(stochastic_round_f16_bits(as_bits(x), word)));
  }
};

}  // namespace cpu
}  // namespace lorenza
