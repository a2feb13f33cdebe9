// Stochastic rounding of float32 values to bfloat16 / float16 driven by the rounding stream
// (docs/rng.md, "The rounding stream"), on the bits: shared by the CPU (g++) and CUDA (nvcc)
// kernels. Header-only, no torch, no CUDA headers.
//
// Each function takes the float32 bits of v and the rounding word x of its element, and returns
// the float32 bits of the result: a value exactly representable in the target dtype, so that the
// backend's round-to-nearest-even conversion then stores it exactly, or v itself where the
// definition rounds to nearest (NaN, +-Inf, |v| >= the largest finite value, and for bfloat16
// |v| < 2^-126). Everything is integer arithmetic, so no float mode (FTZ/DAZ, fast math) changes
// it, and it is written without branches (selects) so that the CPU loops vectorize.
//
// Why the integer form equals the definition (u = (x >> 9) 2^-23, q = v / ulp, r = floor(q) +
// (u < q - floor(q))): let |v|'s significand have k bits below the ulp and F be their value, so
// |q| = T + F 2^-k with T = floor(|q|), and G = F 2^(23 - k) (an integer when k <= 23). Then
//  - v >= 0: r = T + [u < F 2^-k] = T + [X < G] with X = x >> 9 (both sides times 2^23);
//  - v < 0:  floor(q) = -(T + [F > 0]) and q - floor(q) = 1 - F 2^-k when F > 0, so |r| grows to
//    T + 1 iff u >= 1 - F 2^-k, i.e. iff X + G >= 2^23 (never when F = 0).
// Adding 1 at bit k of the float32 bits of a value whose low k bits are clear adds one ulp, the
// carry running into the exponent field when the significand overflows (the next binade).
// When k > 23 (float16 targets, |v| < 2^-24) T = 0, G = F 2^(23 - k) is not an integer and the
// two tests become X < ceil(G) and X + floor(G) >= 2^23.
#pragma once
#include <cstdint>

#include "common/philox.h"  // LORENZA_HD

namespace lorenza {

// c ? a : b on bits, without a branch.
LORENZA_HD uint32_t sr_select(bool c, uint32_t a, uint32_t b) {
  return b ^ ((a ^ b) & (0u - static_cast<uint32_t>(c)));
}

// Whether |r| grows by one ulp: X = x >> 9, g = floor(G), ceil_g = ceil(G) (see above).
LORENZA_HD uint32_t sr_grow(uint32_t sign, uint32_t x, uint32_t g, uint32_t ceil_g) {
  const uint32_t X = x >> 9;
  return sr_select(sign != 0u, (X + g) >> 23, X < ceil_g ? 1u : 0u);
}

// bfloat16: p = 7, so k = 16 for every |v| in [2^-126, max) (a normal float32).
LORENZA_HD uint32_t stochastic_round_bf16_bits(uint32_t bits, uint32_t x) {
  const uint32_t sign = bits & 0x80000000u, a = bits & 0x7FFFFFFFu;
  const uint32_t g = (a & 0xFFFFu) << 7;
  const uint32_t grow = sr_grow(sign, x, g, g);
  const uint32_t r = ((a & 0xFFFF0000u) + (grow << 16)) | sign;
  // round to nearest: a outside [0x00800000, 0x7F7F0000), i.e. |v| < 2^-126 or >= 0x1.FEp127, Inf, NaN
  const bool nearest = a - 0x00800000u >= 0x7F7F0000u - 0x00800000u;
  return sr_select(nearest, bits, r);
}

// float16: p = 10, e_min = -14. With E = v's exponent field, k = 13 for normal halves (E >= 113)
// and 126 - max(E, 1) below (the ulp stays 2^-24), up to 125 for float32 subnormals.
LORENZA_HD uint32_t stochastic_round_f16_bits(uint32_t bits, uint32_t x) {
  const uint32_t sign = bits & 0x80000000u, a = bits & 0x7FFFFFFFu;
  const uint32_t E = a >> 23;
  const uint32_t k = sr_select(E >= 113u, 13u, 126u - sr_select(E > 0u, E, 1u));
  const bool tiny = k > 23u;  // |v| < 2^-24: the result is 0 or 2^-24
  // k <= 23: clear the k bits below the ulp, maybe add one at bit k.
  const uint32_t kk = sr_select(tiny, 23u, k);
  const uint32_t mask = (1u << kk) - 1u;
  const uint32_t g_in = (a & mask) << (23u - kk);
  // k > 23: G = m 2^(23 - k) for the 24-bit significand m (shift clamped to 31: m < 2^24).
  const uint32_t m = (a & 0x7FFFFFu) | sr_select(E > 0u, 0x800000u, 0u);
  const uint32_t j = sr_select(tiny, sr_select(k - 23u < 31u, k - 23u, 31u), 1u);
  const uint32_t g_lo = m >> j;
  const uint32_t inexact = (m & ((1u << j) - 1u)) != 0u ? 1u : 0u;
  const uint32_t g = sr_select(tiny, g_lo, g_in);
  const uint32_t grow = sr_grow(sign, x, g, g + sr_select(tiny, inexact, 0u));
  const uint32_t r_in = (a & ~mask) + (grow << kk);
  const uint32_t r_tiny = sr_select(grow != 0u, 0x33800000u, 0u);  // 2^-24 or 0
  const uint32_t r = sr_select(tiny, r_tiny, r_in) | sign;
  const bool nearest = a >= 0x477FE000u;  // |v| >= 65504, Inf, NaN
  return sr_select(nearest, bits, r);
}

}  // namespace lorenza
