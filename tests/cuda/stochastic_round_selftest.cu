// Host self-test of the CUDA side of the rounding stream (docs/rng.md, "The rounding stream"),
// runnable without a GPU (tests/check_nvcc.sh runs it): rounding4 (philox_keyed with counter word
// 3 = 1) against the reference rounds of common/philox.h and the known answers of docs/rng.md, and
// the integer rounding of common/stochastic_round.h, as nvcc compiles it, against a double
// precision evaluation of the definition (every step of which is exact in double) over random
// float32 bit patterns, the exponent fields where the rounding changes regime, and the words on
// both sides of each decision threshold.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "common/stochastic_round.h"
#include "cuda/philox_gauss.cuh"

using lorenza::Philox4;
using lorenza::gpu::philox_keys;
using lorenza::gpu::rounding4;

static int failures = 0;

static void expect(bool ok, const char* what) {
  if (!ok) {
    std::printf("FAIL: %s\n", what);
    ++failures;
  }
}

static uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

static float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// The definition: the float32 bits of SR(v), or v's own bits where it rounds to nearest (the
// caller's round-to-nearest conversion then stores either exactly).
static uint32_t definition(uint32_t bits, uint32_t x, bool bf16) {
  const float v = float_of(bits);
  const int p = bf16 ? 7 : 10, e_min = bf16 ? -126 : -14;
  const double big = bf16 ? 0x1.FEp127 : 65504.0;
  if (std::isnan(v) || std::isinf(v) || std::fabs(v) >= big || (bf16 && std::fabs(v) < 0x1p-126)) return bits;
  const int e = static_cast<int>((bits >> 23) & 0xFFu) - 127;
  const double ulp = std::ldexp(1.0, (e > e_min ? e : e_min) - p);
  const double q = static_cast<double>(v) / ulp, fl = std::floor(q), frac = q - fl;
  const double u = static_cast<double>(x >> 9) * 0x1p-23;
  const double r = u < frac ? fl + 1.0 : fl;
  return bits_of(std::copysign(static_cast<float>(r * ulp), v));
}

static uint32_t rounded(uint32_t bits, uint32_t x, bool bf16) {
  return bf16 ? lorenza::stochastic_round_bf16_bits(bits, x) : lorenza::stochastic_round_f16_bits(bits, x);
}

int main() {
  // docs/rng.md: the rounding words of elements 0..7 of (seed 0, stream 0) and of (2^64 - 1, 2^32 - 1).
  {
    const uint32_t want0[8] = {0x2dce73e5u, 0x1348e23fu, 0xfcf8e0ecu, 0xa287aadbu,
                               0xe9535be3u, 0x510c4549u, 0x63517a4du, 0x9a6323a7u};
    const uint32_t want1[8] = {0x6518d848u, 0x5e8e9907u, 0x95e25603u, 0xb823c213u,
                               0xb4035cceu, 0x8b2b14a1u, 0x6cd17766u, 0x4623ebb6u};
    uint32_t w[8];
    rounding4(0, 0u, philox_keys(0), w);
    rounding4(1, 0u, philox_keys(0), w + 4);
    expect(std::memcmp(w, want0, sizeof w) == 0, "rounding words of (0, 0), known answer");
    rounding4(0, 0xFFFFFFFFu, philox_keys(~0ull), w);
    rounding4(1, 0xFFFFFFFFu, philox_keys(~0ull), w + 4);
    expect(std::memcmp(w, want1, sizeof w) == 0, "rounding words of (2^64 - 1, 2^32 - 1), known answer");
  }
  uint64_t state = 0x13198a2e03707344ull;
  auto next = [&state]() {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return state;
  };
  // rounding4 == the reference rounds with c3 = 1.
  for (int t = 0; t < 100000; ++t) {
    const uint64_t seed = next(), block = next() >> (t % 64);
    const uint32_t stream = static_cast<uint32_t>(next() >> 32);
    const Philox4 a = lorenza::philox4x32_10(static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32), stream,
                                             1u, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    uint32_t b[4];
    rounding4(block, stream, philox_keys(seed), b);
    if (a.x[0] != b[0] || a.x[1] != b[1] || a.x[2] != b[2] || a.x[3] != b[3]) {
      expect(false, "rounding4 agrees with philox4x32_10(c3 = 1)");
      break;
    }
  }
  // The integer rounding against the definition.
  const uint32_t exps[] = {0, 1, 2, 100, 101, 102, 103, 104, 111, 112, 113, 114, 126, 127, 128, 141, 142, 143, 253,
                           254, 255};
  long checked = 0;
  for (int dtype = 0; dtype < 2; ++dtype) {
    const bool bf16 = dtype == 0;
    bool ok = true;
    for (int t = 0; t < 2000000 && ok; ++t) {
      uint32_t bits = static_cast<uint32_t>(next() >> 32);
      if (t % 4 != 0) bits = (bits & 0x807FFFFFu) | (exps[(next() >> 40) % (sizeof exps / sizeof exps[0])] << 23);
      if (t % 16 == 1) bits &= ~((1u << ((next() >> 40) % 24)) - 1u);  // few significant bits: exact cases
      uint32_t xs[5] = {static_cast<uint32_t>(next() >> 32), 0u, 0xFFFFFFFFu, 0u, 0u};
      // the words on both sides of the threshold X = ceil(frac 2^23), from the definition's frac
      const float v = float_of(bits);
      if (std::isfinite(v)) {
        const int p = bf16 ? 7 : 10, e_min = bf16 ? -126 : -14;
        const int e = static_cast<int>((bits >> 23) & 0xFFu) - 127;
        const double q = static_cast<double>(v) / std::ldexp(1.0, (e > e_min ? e : e_min) - p);
        const double thr = std::ceil((q - std::floor(q)) * 0x1p23);
        const uint32_t x0 = thr >= 1.0 ? static_cast<uint32_t>(thr) - 1u : 0u;
        xs[3] = (x0 < (1u << 23) ? x0 : (1u << 23) - 1u) << 9;
        xs[4] = (thr < 0x1p23 ? static_cast<uint32_t>(thr) : (1u << 23) - 1u) << 9 | 0x1FFu;
      }
      for (uint32_t x : xs) {
        ++checked;
        if (rounded(bits, x, bf16) != definition(bits, x, bf16)) {
          std::printf("  %s v bits %08x word %08x: got %08x, definition %08x\n", bf16 ? "bf16" : "fp16", bits, x,
                      rounded(bits, x, bf16), definition(bits, x, bf16));
          ok = false;
          break;
        }
      }
    }
    expect(ok, bf16 ? "stochastic_round_bf16_bits == the definition" : "stochastic_round_f16_bits == the definition");
  }
  if (failures) {
    std::printf("stochastic_round_selftest: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("stochastic_round_selftest: ok (%ld roundings checked)\n", checked);
  return 0;
}
