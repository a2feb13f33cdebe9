// Host and device helpers shared by the multi-tensor kernels: errors, the device guard, the
// persistent grid size, the record cursor (which tensor a chunk belongs to) and deterministic
// block reductions. Only CUDA runtime headers: the module links cudart_static and no torch.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>

#include "cuda/seeded_ops.h"

namespace lorenza {
namespace gpu {

// --- host --------------------------------------------------------------------------------------

inline void check_arg(bool ok, const char* op, const char* msg) {
  if (!ok) throw std::invalid_argument(std::string("lorenza_kernels.cuda.") + op + ": " + msg);
}

inline void check_cuda(cudaError_t err, const char* op, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lorenza_kernels.cuda.") + op + ": " + what + " failed: " +
                             cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")");
  }
}

// Makes `device` current for the launch and restores the previous device. The extension links
// its own (static) CUDA runtime; it shares the driver's primary context with torch's runtime, so
// selecting the device here is what makes the launch land on the tensors' GPU.
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) : device_(device) {
    check_cuda(cudaGetDevice(&prev_), op, "cudaGetDevice");
    if (prev_ != device_) check_cuda(cudaSetDevice(device_), op, "cudaSetDevice");
  }
  ~DeviceGuard() {
    if (prev_ != device_) cudaSetDevice(prev_);  // best effort: destructors do not throw
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int prev_ = 0;
};

// Grid of a persistent kernel: as many CTAs as fit on the device at once (read off the device and
// the compiled kernel, cached per device and kernel), never more than the work items. The results
// do not depend on it: partials are indexed by work item, not by CTA.
template <class Kernel>
unsigned persistent_grid(Kernel kernel, int device, int64_t work) {
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, int64_t> cache;
  const auto key = std::make_pair(device, reinterpret_cast<const void*>(kernel));
  int64_t resident = 0;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) {
      resident = it->second;
    } else {
      int sms = 0, per_sm = 0;
      check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "launch",
                 "cudaDeviceGetAttribute(MultiProcessorCount)");
      check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0), "launch",
                 "cudaOccupancyMaxActiveBlocksPerMultiprocessor");
      resident = static_cast<int64_t>(sms) * (per_sm > 0 ? per_sm : 1);
      cache.emplace(key, resident);
    }
  }
  return static_cast<unsigned>(work < resident ? work : resident);
}

// --- device ------------------------------------------------------------------------------------

__device__ __forceinline__ int64_t record_begin(const AxpbyRecord* r) { return __ldg(&r->chunk_begin); }
__device__ __forceinline__ int64_t record_begin(const ColsumRecord* r) { return __ldg(&r->item_begin); }
__device__ __forceinline__ int64_t record_begin(const RoundRecord* r) { return __ldg(&r->chunk_begin); }

// A record in 16-byte loads (every thread loads the same address: one broadcast).
template <class R>
__device__ __forceinline__ R load_record(const R* p) {
  static_assert(sizeof(R) % 16 == 0, "records are whole 16-byte words");
  constexpr int kWords = static_cast<int>(sizeof(R) / 16);
  uint4 w[kWords];
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __ldg(reinterpret_cast<const uint4*>(p) + i);
  R r;
  memcpy(&r, w, sizeof(R));
  return r;
}

// Which tensor work item `c` belongs to: the last record whose begin is <= c (empty tensors share
// their begin with the next one and are skipped). A CTA visits increasing c, so the search starts
// at the current record and runs only when c leaves its range.
template <class R>
struct RecordCursor {
  int k = 0;
  int64_t end = -1;

  __device__ __forceinline__ int seek(const R* recs, int n, int64_t total, int64_t c) {
    if (c >= end) {
      int lo = k, hi = n;
      while (hi - lo > 1) {
        const int mid = lo + ((hi - lo) >> 1);
        if (record_begin(recs + mid) <= c) {
          lo = mid;
        } else {
          hi = mid;
        }
      }
      k = lo;
      end = k + 1 < n ? record_begin(recs + k + 1) : total;
    }
    return k;
  }
};

// Sum over the CTA in a fixed order: warp trees, then the warps in index order in float64.
// The result is valid in thread 0. Every thread must call it (it synchronises the CTA).
__device__ __forceinline__ double block_sum(float v, float* warp_sums) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = v;
  __syncthreads();
  double s = 0.0;
  if (threadIdx.x == 0) {
    for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];
  }
  __syncthreads();
  return s;
}

// Fixed-shape tree over the CTA in float64 (valid in thread 0).
__device__ __forceinline__ double block_sum_ordered(double v, double* sums) {
  sums[threadIdx.x] = v;
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w >>= 1) {
    if (static_cast<int>(threadIdx.x) < w) sums[threadIdx.x] += sums[threadIdx.x + w];
    __syncthreads();
  }
  return sums[0];
}

}  // namespace gpu
}  // namespace lorenza
