// lorenza-philox-v1 (docs/rng.md): the integer part of the Gaussian stream, shared by the
// CPU (g++) and CUDA (nvcc) kernels. Header-only, no torch, no CUDA headers.
//
// Element i of stream (seed, stream) comes from block b = i >> 2, lane i & 3:
//   counter (b & 0xFFFFFFFF, b >> 32, stream, 0), key (seed & 0xFFFFFFFF, seed >> 32),
//   x = Philox4x32-10(counter, key) (Salmon et al., SC'11), u_j = ((x_j >> 9) + 0.5) * 2^-23,
//   (z0, z1) = BoxMuller(u0, u1), (z2, z3) = BoxMuller(u2, u3); z_i = z_lane.
// The Box-Muller transcendentals are left to each backend (vector polynomials on the CPU,
// intrinsics on the GPU); every backend must stay within 1e-5 of a float64 evaluation.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define LORENZA_HD __host__ __device__ __forceinline__
#else
#define LORENZA_HD inline __attribute__((always_inline))
#endif

namespace lorenza {

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;

struct Philox4 {
  uint32_t x[4];
};

LORENZA_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

// Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1).
LORENZA_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    philox_mulhilo(kPhiloxM0, c0, hi0, lo0);
    philox_mulhilo(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4{{c0, c1, c2, c3}};
}

// The four words of block b of stream (seed, stream).
LORENZA_HD Philox4 philox_block(uint64_t seed, uint32_t stream, uint64_t block) {
  return philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), stream, 0u,
                       static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// ((x >> 9) + 0.5) * 2^-23: exact in float32, strictly inside (0, 1).
LORENZA_HD float philox_uniform(uint32_t x) {
  return (static_cast<float>(x >> 9) + 0.5f) * 1.1920928955078125e-7f;
}

}  // namespace lorenza
