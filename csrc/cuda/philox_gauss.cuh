// lorenza-philox-v1 on the GPU (docs/rng.md): Philox4x32-10 with a precomputed key
// schedule, and Box-Muller through the special-function unit (MUFU) within the 1e-5 contract.
//
// Everything here is __host__ __device__: on the host the MUFU calls fall back to <cmath>, so the
// same algebra (exact uniforms, the log series near 1, the shifted angle) is unit-tested without a
// GPU by tests/cuda/philox_gauss_selftest.cu. Only CUDA runtime headers and csrc/common are used.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/philox.h"

namespace lorenza {
namespace gpu {

// The ten round keys (k0 + r W0, k1 + r W1). Built once per launch on the host and passed as a
// __grid_constant__ kernel parameter: with the rounds unrolled, ptxas reads each key straight from
// the constant bank as the third operand of the LOP3 that XORs it in, so the key schedule costs
// neither registers nor instructions per Philox call.
struct PhiloxKeys {
  uint32_t k0[kPhiloxRounds];
  uint32_t k1[kPhiloxRounds];
};

inline PhiloxKeys philox_keys(uint64_t seed) {
  PhiloxKeys ks;
  uint32_t a = static_cast<uint32_t>(seed), b = static_cast<uint32_t>(seed >> 32);
  for (int r = 0; r < kPhiloxRounds; ++r, a += kPhiloxW0, b += kPhiloxW1) {
    ks.k0[r] = a;
    ks.k1[r] = b;
  }
  return ks;
}

// Philox4x32-10 of counter (c0, c1, c2, kWord3): the fourth counter word is a constant, 0 for the
// Gaussian stream (which saves the first round one XOR) and 1 for the rounding stream (docs/rng.md).
// Each 32x32 product is one IMAD.WIDE.U32 (hi and lo together).
template <uint32_t kWord3 = 0u>
LORENZA_HD Philox4 philox_keyed(uint32_t c0, uint32_t c1, uint32_t c2, const PhiloxKeys& ks) {
  uint32_t c3 = kWord3;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kPhiloxM0) * c0;
    const uint64_t p1 = static_cast<uint64_t>(kPhiloxM1) * c2;
    c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ ks.k0[r];
    c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ ks.k1[r];
    c1 = static_cast<uint32_t>(p1);
    c3 = static_cast<uint32_t>(p0);
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The float in [1, 2) whose mantissa is x >> 9, i.e. 1 + (x >> 9) 2^-23: one shift-or, no I2F
// (conversions run at a quarter of the FMA rate on sm_80/sm_90).
LORENZA_HD float mantissa_float(uint32_t x) {
  const uint32_t bits = (x >> 9) | 0x3F800000u;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
#endif
}

#if defined(__CUDA_ARCH__)
// Inline PTX so that the result does not depend on --use_fast_math / -ftz (setup.py passes
// --use_fast_math, tests/check_nvcc.sh builds both ways). The inputs are never subnormal.
__device__ __forceinline__ float fast_log2(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ float fast_sqrt(float x) {
  float y;
  asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ void fast_sincos(float x, float& s, float& c) { __sincosf(x, &s, &c); }
#else
// Host stand-ins, used only by the self-test. LORENZA_MUFU_ERROR = 1..4 pushes each one to the
// documented worst-case error of its GPU instruction, with the signs (log, sqrt, revolution
// rounding, sin/cos) of pattern 1: + + + +, 2: - - - -, 3: + - + -, 4: - + - +; 0 is plain <cmath>.
#ifndef LORENZA_MUFU_ERROR
#define LORENZA_MUFU_ERROR 0
#endif
constexpr int kMufuSign[5][4] = {{0, 0, 0, 0}, {1, 1, 1, 1}, {-1, -1, -1, -1}, {1, -1, 1, -1}, {-1, 1, -1, 1}};
constexpr const int* kMufu = kMufuSign[LORENZA_MUFU_ERROR];
inline float fast_log2(float x) {  // lg2.approx: 2^-22 absolute on [0.5, 2], else 2 ulp
  const double y = std::log2(static_cast<double>(x));
  const double err = (x >= 0.5f && x <= 2.0f) ? 0x1p-22 : 0x1p-23 * std::fabs(y);
  return static_cast<float>(y + kMufu[0] * err);
}
inline float fast_sqrt(float x) {  // sqrt.approx: taken as 2 ulp relative
  return static_cast<float>(std::sqrt(static_cast<double>(x)) * (1.0 + kMufu[1] * 0x1p-22));
}
inline void fast_sincos(float x, float& s, float& c) {
  // ptxas scales radians to revolutions with FMUL.RZ (up to 1 ulp), then MUFU: 2^-21.41 absolute.
  float rev = x * 0.159154936f;
  rev = std::nextafter(rev, kMufu[2] > 0 ? 1.0f : kMufu[2] < 0 ? -1.0f : rev);
  const double a = 6.283185307179586476925286766559 * rev, err = kMufu[3] * 3.6e-7;
  s = static_cast<float>((kMufu[2] == 0 ? std::sin(static_cast<double>(x)) : std::sin(a)) + err);
  c = static_cast<float>((kMufu[2] == 0 ? std::cos(static_cast<double>(x)) : std::cos(a)) + err);
}
#endif

// Box-Muller on one pair of words (docs/rng.md step 6): z_cos = r cos(2 pi u_b), z_sin = r sin(2 pi u_b),
// r = sqrt(-2 ln u_a). Error analysis against the float64 definition (documented bounds of the
// intrinsics, CUDA C++ Programming Guide, "Intrinsic Functions":
// https://docs.nvidia.com/cuda/cuda-c-programming-guide/#intrinsic-functions):
// - u_a = f - (1 - 2^-24) and w = 1 - u_a are exact (Sterbenz; every u is (2k+1) 2^-24).
// - lg2.approx has an absolute error up to 2^-22 on [0.5, 2]. As u_a -> 1, ln u_a -> 0 and
//   dr = d(-2 ln u)/(2r) explodes (3e-4 and even NaN at u = 1 - 2^-24). Below w = 2^-7 the series
//   -2 ln(1 - w) = 2w + w^2 + 2w^3/3 (+ w^4/2 ...) is used instead: truncation < 1.3e-7 relative,
//   and at the switch r >= 0.177 so the MUFU side contributes dr <= 1e-6.
// - sin.approx/cos.approx: 2^-21.41 absolute only on [-pi, pi]. 2 pi u_b lies in (0, 2 pi), so we
//   evaluate at 2 pi v, v = u_b - 1/2 = (f - 1.5) + 2^-24 (exact), and negate: cos(2 pi u) =
//   -cos(2 pi v). One FFMA forms 2 pi v (|theta| < pi: < 1.2e-7 rounding, 8.7e-8 from float(2 pi)),
//   and ptxas rescales to revolutions before MUFU.SIN (< 1.9e-7 more).
// - Worst case at r = 5.77 (u_a = 2^-24): 5.77 * (3.6e-7 + 4e-7) + 1.4e-6 (sqrt, log) ~ 6e-6 < 1e-5.
//   With every bound taken at its worst sign, the host self-test (tests/cuda/philox_gauss_selftest.cu,
//   LORENZA_MUFU_ERROR=1..4) sees at most 4.6e-6 over 8M values and the extreme uniforms.
//   (sincospif would be exact in the argument but costs ~20 FMA-pipe instructions per pair instead
//   of two MUFU, and bf16 is already near compute-bound.)
LORENZA_HD void box_muller(uint32_t xa, uint32_t xb, float& z_cos, float& z_sin) {
  const float u = mantissa_float(xa) - 0.99999994039535522f;  // 1 - 2^-24
  const float w = 1.0f - u;
  const float x_series = w * fmaf(w, fmaf(w, 0.6666667f, 1.0f), 2.0f);
  const float x_log = fast_log2(u) * -1.38629436f;  // -2 ln 2
  const float x = w < 0.0078125f ? x_series : x_log;
  const float r = fast_sqrt(x);
  const float d = mantissa_float(xb) - 1.5f;
  const float theta = fmaf(d, 6.28318548f, 3.74507025e-7f);  // 2 pi (d + 2^-24)
  float s, c;
  fast_sincos(theta, s, c);
  z_cos = -r * c;
  z_sin = -r * s;
}

// The four normals of Philox block `block` of stream `stream` (elements 4 block .. 4 block + 3).
LORENZA_HD void gaussian4(uint64_t block, uint32_t stream, const PhiloxKeys& ks, float z[4]) {
  const Philox4 p = philox_keyed(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), stream, ks);
  box_muller(p.x[0], p.x[1], z[0], z[1]);
  box_muller(p.x[2], p.x[3], z[2], z[3]);
}

// The four rounding words of block `block` (docs/rng.md, "The rounding stream": counter word 3 = 1),
// under the rounding seed's key schedule.
LORENZA_HD void rounding4(uint64_t block, uint32_t stream, const PhiloxKeys& ks, uint32_t w[4]) {
  const Philox4 p = philox_keyed<1u>(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), stream, ks);
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int j = 0; j < 4; ++j) w[j] = p.x[j];
}

}  // namespace gpu
}  // namespace lorenza
