// Loads and stores of one 16-byte unit of a tensor (4 fp32 or 8 bf16/fp16 elements), whatever
// the alignment of the tensor's first element, and the float32 <-> dtype conversions.
//
// A unit always starts at a multiple of 16 bytes from element 0, so every unit of a tensor has
// the alignment of its base address: a 16-byte aligned tensor uses one 128-bit access per unit,
// a view that starts at an odd element falls back to 8-, 4- or 2-byte accesses. Warps stay fully
// coalesced either way (consecutive lanes own consecutive units); only the instruction count
// grows. The Philox blocks never straddle units, so misalignment costs no extra random numbers.
//
// Loads and stores use the streaming cache hints (ld.global.cs / st.global.cs): every byte is
// touched once, and evicting it first keeps the metadata table and row vectors resident in L2.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/dtype.h"

namespace lorenza {
namespace gpu {

// Element size and elements per 16-byte unit.
template <int DT>
struct DTypeTraits {
  static constexpr int kBytes = DT == kFloat32 ? 4 : 2;
  static constexpr int kUnitElems = 16 / kBytes;
};

// Largest power of two (<= 16) dividing the address.
__device__ __forceinline__ int address_alignment(uint64_t addr) {
  const uint64_t low = (addr | 16u) & (~(addr | 16u) + 1u);
  return static_cast<int>(low);
}

template <bool kAligned16>
__device__ __forceinline__ uint4 load_unit(const char* p, int align) {
  if (kAligned16 || align == 16) return __ldcs(reinterpret_cast<const uint4*>(p));
  uint32_t w[4];
  if (align == 8) {
    const uint2 a = __ldcs(reinterpret_cast<const uint2*>(p));
    const uint2 b = __ldcs(reinterpret_cast<const uint2*>(p + 8));
    w[0] = a.x, w[1] = a.y, w[2] = b.x, w[3] = b.y;
  } else if (align == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) w[j] = __ldcs(reinterpret_cast<const unsigned int*>(p + 4 * j));
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t lo = __ldcs(reinterpret_cast<const unsigned short*>(p + 4 * j));
      const uint32_t hi = __ldcs(reinterpret_cast<const unsigned short*>(p + 4 * j + 2));
      w[j] = lo | (hi << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <bool kAligned16>
__device__ __forceinline__ void store_unit(char* p, int align, const uint4& v) {
  if (kAligned16 || align == 16) {
    __stcs(reinterpret_cast<uint4*>(p), v);
    return;
  }
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  if (align == 8) {
    __stcs(reinterpret_cast<uint2*>(p), make_uint2(w[0], w[1]));
    __stcs(reinterpret_cast<uint2*>(p + 8), make_uint2(w[2], w[3]));
  } else if (align == 4) {
#pragma unroll
    for (int j = 0; j < 4; ++j) __stcs(reinterpret_cast<unsigned int*>(p + 4 * j), w[j]);
  } else {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      __stcs(reinterpret_cast<unsigned short*>(p + 4 * j), static_cast<unsigned short>(w[j]));
      __stcs(reinterpret_cast<unsigned short*>(p + 4 * j + 2), static_cast<unsigned short>(w[j] >> 16));
    }
  }
}

// The last unit of a tensor: only its first `nv` elements exist. Element-sized accesses are
// always aligned (torch aligns every element to its size).
template <int DT>
__device__ __forceinline__ uint4 load_partial(const char* p, int nv) {
  uint32_t w[4] = {0u, 0u, 0u, 0u};
  constexpr int kB = DTypeTraits<DT>::kBytes;
#pragma unroll
  for (int j = 0; j < DTypeTraits<DT>::kUnitElems; ++j) {
    if (j >= nv) break;
    if (kB == 4) {
      w[j] = __ldcs(reinterpret_cast<const unsigned int*>(p + 4 * j));
    } else {
      const uint32_t h = __ldcs(reinterpret_cast<const unsigned short*>(p + 2 * j));
      w[j >> 1] |= h << (16 * (j & 1));
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <int DT>
__device__ __forceinline__ void store_partial(char* p, int nv, const uint4& v) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
  constexpr int kB = DTypeTraits<DT>::kBytes;
#pragma unroll
  for (int j = 0; j < DTypeTraits<DT>::kUnitElems; ++j) {
    if (j >= nv) break;
    if (kB == 4) {
      __stcs(reinterpret_cast<unsigned int*>(p + 4 * j), w[j]);
    } else {
      __stcs(reinterpret_cast<unsigned short*>(p + 2 * j), static_cast<unsigned short>(w[j >> 1] >> (16 * (j & 1))));
    }
  }
}

// Unit words -> float32 values (exact for every dtype).
template <int DT>
__device__ __forceinline__ void unpack(const uint4& v, float* out) {
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (DT == kFloat32) {
      out[j] = __uint_as_float(w[j]);
    } else if (DT == kBFloat16) {
      out[2 * j] = __uint_as_float(w[j] << 16);
      out[2 * j + 1] = __uint_as_float(w[j] & 0xFFFF0000u);
    } else {
      out[2 * j] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[j])));
      out[2 * j + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(w[j] >> 16)));
    }
  }
}

// float32 values -> unit words, rounded once to nearest even (cvt.rn.{bf16x2,f16x2}.f32:
// one F2FP instruction per pair on sm_80+; overflow goes to inf and NaN stays NaN, as in torch).
template <int DT>
__device__ __forceinline__ uint4 pack(const float* in) {
  uint32_t w[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if (DT == kFloat32) {
      w[j] = __float_as_uint(in[j]);
    } else if (DT == kBFloat16) {
      const __nv_bfloat162 h = __floats2bfloat162_rn(in[2 * j], in[2 * j + 1]);
      w[j] = static_cast<uint32_t>(__bfloat16_as_ushort(__low2bfloat16(h))) |
             (static_cast<uint32_t>(__bfloat16_as_ushort(__high2bfloat16(h))) << 16);
    } else {
      const __half2 h = __floats2half2_rn(in[2 * j], in[2 * j + 1]);
      w[j] = static_cast<uint32_t>(__half_as_ushort(__low2half(h))) |
             (static_cast<uint32_t>(__half_as_ushort(__high2half(h))) << 16);
    }
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

}  // namespace gpu
}  // namespace lorenza
