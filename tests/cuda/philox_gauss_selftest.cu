// Host self-test of csrc/cuda/philox_gauss.cuh, runnable without a GPU (tests/check_nvcc.sh runs
// it): the keyed Philox against the reference rounds of common/philox.h and Random123's known
// answer, and the host build of the Box-Muller algebra (exact uniforms, the log series near 1,
// the shifted angle, the signs) against a float64 evaluation of docs/rng.md and its known values.
// On the host the MUFU approximations are replaced by <cmath>; built with -DLORENZA_MUFU_ERROR=1..4
// they are pushed to their documented worst-case errors, which checks the error analysis too.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "cuda/philox_gauss.cuh"

using lorenza::Philox4;
using lorenza::gpu::gaussian4;
using lorenza::gpu::philox_keyed;
using lorenza::gpu::philox_keys;

static int failures = 0;

static void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

// docs/rng.md steps 5-6 in float64.
static void reference4(uint64_t seed, uint32_t stream, uint64_t block, double z[4]) {
  const Philox4 p = lorenza::philox_block(seed, stream, block);
  const double two_pi = 6.283185307179586476925286766559;
  for (int h = 0; h < 2; ++h) {
    const double ua = ((p.x[2 * h] >> 9) + 0.5) * 0x1p-23, ub = ((p.x[2 * h + 1] >> 9) + 0.5) * 0x1p-23;
    const double r = std::sqrt(-2.0 * std::log(ua));
    z[2 * h] = r * std::cos(two_pi * ub);
    z[2 * h + 1] = r * std::sin(two_pi * ub);
  }
}

int main() {
  // Random123 kat_vectors, the one with counter word 3 == 0 (philox_keyed fixes it to 0).
  {
    const Philox4 p = philox_keyed(0u, 0u, 0u, philox_keys(0));
    expect(p.x[0] == 0x6627e8d5u && p.x[1] == 0xe169c58du && p.x[2] == 0xbc57ac4cu && p.x[3] == 0x9b00dbd8u,
           "Philox4x32-10 known answer (zero counter, zero key)");
  }
  // Keyed rounds == the reference rounds, over counters with high words and many keys.
  uint64_t state = 0x243f6a8885a308d3ull;
  auto next = [&state]() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return state;
  };
  for (int t = 0; t < 100000; ++t) {
    const uint64_t seed = next(), block = next() >> (t % 64);
    const uint32_t stream = static_cast<uint32_t>(next() >> 32);
    const Philox4 a = lorenza::philox_block(seed, stream, block);
    const Philox4 b = philox_keyed(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), stream,
                                   philox_keys(seed));
    if (a.x[0] != b.x[0] || a.x[1] != b.x[1] || a.x[2] != b.x[2] || a.x[3] != b.x[3]) {
      expect(false, "philox_keyed agrees with philox_block");
      break;
    }
  }
  // docs/rng.md known values (7 decimals).
  struct Known {
    uint64_t seed;
    uint32_t stream;
    double z[8];
  };
  const Known known[] = {
      {0, 0, {0.9911375, -0.9246628, -0.6176091, -0.4820683, -0.1536382, 0.1808258, 0.8317351, 0.1974396}},
      {1, 1, {-0.1650479, 2.6764474, -1.5598533, 0.7548958, 1.5844943, -0.6431312, -0.3800066, 0.5067777}},
      {1099511627783ull,
       3,
       {-0.2224926, -0.3849995, -1.0488936, 0.5205431, -1.4329347, 0.6782839, 0.1174121, -1.0960013}},
      {123456789, 0, {-0.8675240, 1.7846837, 0.4166728, 0.4518241, 1.1816259, 0.0326168, 0.6252942, 1.3828443}},
  };
  for (const Known& k : known) {
    const auto ks = philox_keys(k.seed);
    float z[8];
    gaussian4(0, k.stream, ks, z);
    gaussian4(1, k.stream, ks, z + 4);
    for (int i = 0; i < 8; ++i) expect(std::fabs(z[i] - k.z[i]) < 1e-5, "docs/rng.md known values");
  }
  // Every element against float64, several seeds and streams, including the extreme uniforms
  // (u -> 1 exercises the log series, u -> 0 the largest radius).
  double worst = 0.0;
  const uint64_t seeds[] = {0ull, 1ull, 123456789ull, 0xFFFFFFFFFFFFFFFFull, 1099511627783ull};
  for (uint64_t seed : seeds) {
    const auto ks = philox_keys(seed);
    for (uint32_t stream : {0u, 7u, 0xFFFFFFFFu}) {
      for (uint64_t b = 0; b < (1u << 17); ++b) {
        const uint64_t block = b + (seed & 1 ? (1ull << 32) : 0);  // high counter word too
        float z[4];
        double r[4];
        gaussian4(block, stream, ks, z);
        reference4(seed, stream, block, r);
        for (int i = 0; i < 4; ++i) worst = std::fmax(worst, std::fabs(z[i] - r[i]));
      }
    }
  }
  for (uint32_t k = 0; k < (1u << 23); k += (k < 4096 || k > (1u << 23) - 4096) ? 1 : 997) {
    float zc, zs;
    lorenza::gpu::box_muller(k << 9, (k * 2654435761u) << 9, zc, zs);
    const double ua = (k + 0.5) * 0x1p-23, ub = (((k * 2654435761u) << 9 >> 9) + 0.5) * 0x1p-23;
    const double rr = std::sqrt(-2.0 * std::log(ua)), th = 6.283185307179586476925286766559 * ub;
    worst = std::fmax(worst, std::fmax(std::fabs(zc - rr * std::cos(th)), std::fabs(zs - rr * std::sin(th))));
  }
  std::printf("host Box-Muller (LORENZA_MUFU_ERROR=%d): max |z - z_float64| = %.3e (contract 1e-5)\n",
              LORENZA_MUFU_ERROR, worst);
  // Plain <cmath>: only float32 rounding remains. Worst-case intrinsic errors: the contract.
  expect(worst < (LORENZA_MUFU_ERROR == 0 ? 2e-6 : 1e-5), "host Box-Muller accuracy");
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("philox_gauss self-test passed\n");
  return 0;
}
