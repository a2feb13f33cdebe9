// Element dtypes the kernels accept, and float32 <-> bfloat16 / float16 conversions for the
// torch-free CPU code (round to nearest even, as torch does).
#pragma once
#include <cstdint>
#include <cstring>

namespace lorenza {

// Codes passed from Python (lorenza_kernels/_dtypes.py keeps the same table).
enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

inline float bf16_to_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

inline float half_to_float(uint16_t h) { return static_cast<float>(*reinterpret_cast<const _Float16*>(&h)); }

inline uint16_t float_to_half(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t out;
  std::memcpy(&out, &h, 2);
  return out;
}

}  // namespace lorenza
