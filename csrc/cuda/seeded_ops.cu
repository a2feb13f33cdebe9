// CUDA seeded perturbation ops (docs/kernels.md section 1), one launch for a whole list of tensors:
//
//   seeded_axpby_:  t_k <- beta_k t_k + alpha_k z_k (+ gamma_k a_k[i % ncols_k]), in float32,
//                   rounded once to t_k's dtype, plus sum(z_k^2) from the same pass;
//   seeded_colsum:  column sums of z_k viewed as m_k x n_k, reading no tensor data,
//   stochastic_round_: dst_k <- SR(src_k), float32 src_k rounded stochastically to dst_k's dtype,
//
// with z_k the lorenza-philox-v1 stream (seed, streams[k]) and SR driven by the rounding stream
// (docs/rng.md, "The rounding stream"; seeded_axpby_ rounds stochastically when given a rounding
// seed). Element i of tensor k is stream index offset_k + i (a shard of a larger tensor; offset 0
// by default): an offset that is a multiple of 4 keeps every unit on whole Philox blocks, another
// one costs a second Philox call per four elements. The rounding itself is integer arithmetic shared with the CPU (common/stochastic_round.h).
//
// Work split. seeded_axpby_ cuts each tensor into chunks of kChunkUnits 16-byte units (seeded_ops.h);
// a persistent grid strides over the chunks of all tensors, and each CTA finds the tensor of its
// chunk by binary search over the records' chunk_begin (skipped while it stays in one tensor).
// Reductions never use float atomics: each chunk (each colsum work item) writes one partial from
// a fixed tree, and a second small kernel sums each tensor's partials in index order. The
// partition depends only on the shapes, so results are bit-identical from run to run and for any
// grid size or GPU model. Multi-tensor launch layout inspired by PyTorch's multi_tensor_apply
// (https://github.com/pytorch/pytorch/blob/main/aten/src/ATen/native/cuda/MultiTensorApply.cuh),
// with a device-side table instead of kernel-argument chunks so that any number of tensors fits.
#include <cuda_runtime.h>

#include <climits>

#include "common/stochastic_round.h"
#include "cuda/launch_utils.cuh"
#include "cuda/philox_gauss.cuh"
#include "cuda/seeded_ops.h"
#include "cuda/unit_io.cuh"

namespace lorenza {
namespace gpu {
namespace {

// --- noise at any flat index ----------------------------------------------------------------

// Values s .. s+3 out of the two groups of four w[0..7] that hold s rounded down to a multiple of
// 4 and the group after it: the window is shifted by two conditional stages (by 1, then by 2), so
// no register array is indexed at run time (which would spill it to local memory).
template <typename T>
__device__ __forceinline__ void window4(uint64_t s, const T w[8], T out[4]) {
  const bool odd = s & 1u, two = s & 2u;
  T v[6];
#pragma unroll
  for (int q = 0; q < 6; ++q) v[q] = odd ? w[q + 1] : w[q];
#pragma unroll
  for (int q = 0; q < 4; ++q) out[q] = two ? v[q + 2] : v[q];
}

// z at flat indices s .. s+3 when s is not a multiple of 4: the tail of block s >> 2 and the head
// of the next (window4).
__device__ __forceinline__ void gaussian4_at(uint64_t s, uint32_t stream, const PhiloxKeys& ks, float z[4]) {
  if ((s & 3u) == 0) {
    gaussian4(s >> 2, stream, ks, z);
    return;
  }
  float w[8];
  gaussian4(s >> 2, stream, ks, w);
  gaussian4((s >> 2) + 1, stream, ks, w + 4);
  window4(s, w, z);
}

// The rounding words of flat indices s .. s+3 when s is not a multiple of 4 (as gaussian4_at).
__device__ __forceinline__ void rounding4_at(uint64_t s, uint32_t stream, const PhiloxKeys& rks, uint32_t x[4]) {
  uint32_t w[8];
  rounding4(s >> 2, stream, rks, w);
  rounding4((s >> 2) + 1, stream, rks, w + 4);
  window4(s, w, x);
}

// The normals (rounding words) of flat indices s .. s+3: one Philox call when s is a multiple of 4
// (kBlock: a tensor at offset 0, or a shard whose offset is), two otherwise. The choice is per
// tensor, made once per chunk by the callers' dispatch, so each variant is compiled separately.
template <bool kBlock>
__device__ __forceinline__ void noise4(uint64_t s, uint32_t stream, const PhiloxKeys& ks, float z[4]) {
  if constexpr (kBlock) {
    gaussian4(s >> 2, stream, ks, z);
  } else {
    gaussian4_at(s, stream, ks, z);
  }
}

template <bool kBlock>
__device__ __forceinline__ void words4(uint64_t s, uint32_t stream, const PhiloxKeys& rks, uint32_t x[4]) {
  if constexpr (kBlock) {
    rounding4(s >> 2, stream, rks, x);
  } else {
    rounding4_at(s, stream, rks, x);
  }
}

// --- stochastic rounding of one unit ----------------------------------------------------------

// y[j] <- SR(y[j]) for the E elements of a unit starting at stream index g0 (offset + a multiple of
// 4), with the rounding stream (rks, stream): E / 4 Philox calls (twice that when the offset is not
// a multiple of 4). The results are exact in DT, so pack<DT>'s round-to-nearest conversion stores
// them unchanged. float32 units are left alone.
template <int DT, int E, bool kBlock>
__device__ __forceinline__ void round_unit(float (&y)[E], int64_t g0, uint32_t stream, const PhiloxKeys& rks) {
  if constexpr (DT != kFloat32) {
    uint32_t w[E];
#pragma unroll
    for (int q = 0; q < E / 4; ++q) words4<kBlock>(static_cast<uint64_t>(g0) + 4 * q, stream, rks, w + 4 * q);
#pragma unroll
    for (int j = 0; j < E; ++j) {
      const uint32_t b = __float_as_uint(y[j]);
      y[j] = __uint_as_float(DT == kBFloat16 ? stochastic_round_bf16_bits(b, w[j]) : stochastic_round_f16_bits(b, w[j]));
    }
  }
}

// --- seeded_axpby_ -----------------------------------------------------------------------------

// One chunk of one tensor; returns this thread's sum of z^2 over its units (fixed order).
template <int DT, bool kAligned16, bool kRows, bool kRound, bool kBlock>
__device__ __forceinline__ float axpby_chunk(const AxpbyRecord& rec, int64_t chunk, const PhiloxKeys& ks,
                                             const PhiloxKeys& rks) {
  constexpr int E = DTypeTraits<DT>::kUnitElems;
  const int64_t numel = rec.numel;
  const int64_t units = (numel + E - 1) / E;
  const int64_t u_end = min(units, (chunk + 1) * kChunkUnits);
  int64_t u = chunk * kChunkUnits + threadIdx.x;
  char* const base = reinterpret_cast<char*>(rec.data);
  const int align = address_alignment(rec.data);
  const bool read_t = rec.read_t != 0;  // beta == 0: t is not read (NaN/Inf in it do not leak)
  const float* const row = reinterpret_cast<const float*>(rec.row);
  // Column of this thread's first element, then advanced per unit without 64-bit divisions.
  int64_t col = 0, col_step = 0;
  if (kRows && row != nullptr) {
    col = static_cast<int64_t>(static_cast<uint64_t>(u * E) % static_cast<uint64_t>(rec.ncols));
    col_step = static_cast<int64_t>(static_cast<uint64_t>(kThreads) * E % static_cast<uint64_t>(rec.ncols));
  }
  float acc = 0.0f;
  for (; u < u_end; u += kThreads) {
    const int64_t i0 = u * E;
    const bool full = i0 + E <= numel;
    const int nv = full ? E : static_cast<int>(numel - i0);
    char* const p = base + u * kUnitBytes;
    // Issue the load first: the Philox rounds below do not depend on it and hide its latency.
    uint4 raw = make_uint4(0u, 0u, 0u, 0u);
    if (read_t) raw = full ? load_unit<kAligned16>(p, align) : load_partial<DT>(p, nv);
    const int64_t g0 = rec.offset + i0;  // the stream index of this unit's first element
    float z[E];
#pragma unroll
    for (int q = 0; q < E / 4; ++q) noise4<kBlock>(static_cast<uint64_t>(g0) + 4 * q, rec.stream, ks, z + 4 * q);
    float y[E];
    unpack<DT>(raw, y);
#pragma unroll
    for (int j = 0; j < E; ++j) y[j] = read_t ? fmaf(rec.beta, y[j], rec.alpha * z[j]) : rec.alpha * z[j];
    if (kRows && row != nullptr) {
#pragma unroll
      for (int j = 0; j < E; ++j) {
        int64_t c = col + j;
        while (c >= rec.ncols) c -= rec.ncols;  // at most once unless ncols < E
        y[j] = fmaf(rec.gamma, __ldg(row + c), y[j]);
      }
      col += col_step;
      if (col >= rec.ncols) col -= rec.ncols;
    }
    if (kRound) round_unit<DT, E, kBlock>(y, g0, rec.stream, rks);
    const uint4 out = pack<DT>(y);
    if (full) {
#pragma unroll
      for (int j = 0; j < E; ++j) acc = fmaf(z[j], z[j], acc);
      store_unit<kAligned16>(p, align, out);
    } else {
#pragma unroll
      for (int j = 0; j < E; ++j) acc = j < nv ? fmaf(z[j], z[j], acc) : acc;
      store_partial<DT>(p, nv, out);
    }
  }
  return acc;
}

// Tensors whose base is 16-byte aligned (all caching-allocator tensors) take the 128-bit path; an
// element offset that is not a multiple of 4 (a shard starting inside a Philox block) the two-call one.
template <int DT, bool kRows, bool kRound>
__device__ __forceinline__ float axpby_by_alignment(const AxpbyRecord& rec, int64_t chunk, const PhiloxKeys& ks,
                                                    const PhiloxKeys& rks) {
  if ((rec.offset & 3) != 0) return axpby_chunk<DT, false, kRows, kRound, false>(rec, chunk, ks, rks);
  if ((rec.data & 15u) == 0) return axpby_chunk<DT, true, kRows, kRound, true>(rec, chunk, ks, rks);
  return axpby_chunk<DT, false, kRows, kRound, true>(rec, chunk, ks, rks);
}

// The dtype is uniform over a chunk, so the switch never diverges inside a warp. float32 is never
// rounded stochastically: its kernel is the same with or without a rounding seed.
template <bool kRows, bool kRound>
__device__ float axpby_dispatch(const AxpbyRecord& rec, int64_t chunk, const PhiloxKeys& ks, const PhiloxKeys& rks) {
  switch (rec.dtype) {
    case kFloat32:
      return axpby_by_alignment<kFloat32, kRows, false>(rec, chunk, ks, rks);
    case kBFloat16:
      return axpby_by_alignment<kBFloat16, kRows, kRound>(rec, chunk, ks, rks);
    default:
      return axpby_by_alignment<kFloat16, kRows, kRound>(rec, chunk, ks, rks);
  }
}

// `rks`: the rounding seed's key schedule, read only when kRound.
template <bool kRows, bool kRound>
__global__ void __launch_bounds__(kThreads)
    seeded_axpby_kernel(const AxpbyRecord* __restrict__ recs, int num_tensors, int64_t num_chunks,
                        const __grid_constant__ PhiloxKeys ks, const __grid_constant__ PhiloxKeys rks,
                        double* __restrict__ partials) {
  __shared__ float warp_sums[kThreads / 32];
  RecordCursor<AxpbyRecord> cursor;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int k = cursor.seek(recs, num_tensors, num_chunks, c);
    const AxpbyRecord rec = load_record(recs + k);
    const float acc = axpby_dispatch<kRows, kRound>(rec, c - rec.chunk_begin, ks, rks);
    const double total = block_sum(acc, warp_sums);
    if (threadIdx.x == 0) partials[c] = total;
  }
}

// norms[k] = sum of tensor k's chunk partials, in chunk order (one CTA per tensor).
__global__ void __launch_bounds__(kThreads)
    seeded_axpby_norms_kernel(const AxpbyRecord* __restrict__ recs, int num_tensors, int64_t num_chunks,
                              const double* __restrict__ partials, float* __restrict__ norms) {
  __shared__ double sums[kThreads];
  const int k = blockIdx.x;
  const int64_t begin = record_begin(recs + k);
  const int64_t end = k + 1 < num_tensors ? record_begin(recs + k + 1) : num_chunks;
  double s = 0.0;
  for (int64_t c = begin + threadIdx.x; c < end; c += kThreads) s += partials[c];
  s = block_sum_ordered(s, sums);
  if (threadIdx.x == 0) norms[k] = static_cast<float>(s);
}

// --- stochastic_round_ -------------------------------------------------------------------------

// One chunk of one (dst, src) pair: each thread rounds whole 16-byte units of dst, reading the
// matching 16 or 32 bytes of float32 src. kAligned16: both bases are 16-byte aligned.
template <int DT, bool kAligned16, bool kBlock>
__device__ __forceinline__ void round_chunk(const RoundRecord& rec, int64_t chunk, const PhiloxKeys& rks) {
  constexpr int E = DTypeTraits<DT>::kUnitElems;
  const int64_t numel = rec.numel;
  const int64_t units = (numel + E - 1) / E;
  const int64_t u_end = min(units, (chunk + 1) * kChunkUnits);
  char* const dst = reinterpret_cast<char*>(rec.dst);
  const char* const src = reinterpret_cast<const char*>(rec.src);
  const int dst_align = address_alignment(rec.dst), src_align = address_alignment(rec.src);
  for (int64_t u = chunk * kChunkUnits + threadIdx.x; u < u_end; u += kThreads) {
    const int64_t i0 = u * E;
    const bool full = i0 + E <= numel;
    const int nv = full ? E : static_cast<int>(numel - i0);
    float y[E];
#pragma unroll
    for (int h = 0; h < E / 4; ++h) {  // E / 4 pieces of 16 bytes (4 floats) of src
      const char* const p = src + (i0 + 4 * h) * 4;
      const int n_h = nv - 4 * h;
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (n_h >= 4) {
        raw = load_unit<kAligned16>(p, src_align);
      } else if (n_h > 0) {
        raw = load_partial<kFloat32>(p, n_h);
      }
      unpack<kFloat32>(raw, y + 4 * h);
    }
    round_unit<DT, E, kBlock>(y, rec.offset + i0, rec.stream, rks);
    const uint4 out = pack<DT>(y);
    char* const q = dst + u * kUnitBytes;
    if (full) {
      store_unit<kAligned16>(q, dst_align, out);
    } else {
      store_partial<DT>(q, nv, out);
    }
  }
}

template <int DT>
__device__ __forceinline__ void round_by_alignment(const RoundRecord& rec, int64_t chunk, const PhiloxKeys& rks) {
  if ((rec.offset & 3) != 0) {
    round_chunk<DT, false, false>(rec, chunk, rks);
  } else if (((rec.dst | rec.src) & 15u) == 0) {
    round_chunk<DT, true, true>(rec, chunk, rks);
  } else {
    round_chunk<DT, false, true>(rec, chunk, rks);
  }
}

__global__ void __launch_bounds__(kThreads)
    stochastic_round_kernel(const RoundRecord* __restrict__ recs, int num_tensors, int64_t num_chunks,
                            const __grid_constant__ PhiloxKeys rks) {
  RecordCursor<RoundRecord> cursor;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int k = cursor.seek(recs, num_tensors, num_chunks, c);
    const RoundRecord rec = load_record(recs + k);
    switch (rec.dtype) {  // uniform over the chunk
      case kFloat32:
        round_by_alignment<kFloat32>(rec, c - rec.chunk_begin, rks);
        break;
      case kBFloat16:
        round_by_alignment<kBFloat16>(rec, c - rec.chunk_begin, rks);
        break;
      default:
        round_by_alignment<kFloat16>(rec, c - rec.chunk_begin, rks);
        break;
    }
  }
}

// --- seeded_colsum -----------------------------------------------------------------------------

__global__ void __launch_bounds__(kThreads)
    seeded_colsum_kernel(const ColsumRecord* __restrict__ recs, int num_tensors, int64_t num_items,
                         const __grid_constant__ PhiloxKeys ks, float* __restrict__ workspace) {
  __shared__ float red[4][kThreads];
  RecordCursor<ColsumRecord> cursor;
  for (int64_t item = blockIdx.x; item < num_items; item += gridDim.x) {
    const int k = cursor.seek(recs, num_tensors, num_items, item);
    const ColsumRecord rec = load_record(recs + k);
    const int64_t local = item - rec.item_begin;
    const int64_t slab = local / rec.col_tiles;
    const int64_t tile = local - slab * rec.col_tiles;
    const int tc_count = 1 << rec.tc_log2, tr_count = kThreads >> rec.tc_log2;
    const int tc = threadIdx.x & (tc_count - 1), tr = threadIdx.x >> rec.tc_log2;
    const int64_t j0 = (tile * tc_count + tc) * 4;
    const int64_t r_end = min(rec.m, (slab + 1) * rec.rows_per_slab);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (j0 < rec.n) {
      for (int64_t i = slab * rec.rows_per_slab + tr; i < r_end; i += tr_count) {
        float z[4];
        gaussian4_at(static_cast<uint64_t>(rec.offset + i * rec.n + j0), rec.stream, ks, z);
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[q] += z[q];
      }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) red[q][threadIdx.x] = acc[q];
    __syncthreads();
    // Output (group g, lane q) sums the TR thread rows of column 4 (tile TC + g) + q in order
    // (TC up to 256 when the matrix has a single row: then up to 4 outputs per thread).
    for (int o = threadIdx.x; o < 4 * tc_count; o += kThreads) {
      const int g = o >> 2, q = o & 3;
      float s = 0.0f;
      for (int t = 0; t < tr_count; ++t) s += red[q][t * tc_count + g];
      const int64_t col = (tile * tc_count + g) * 4 + q;
      if (col < rec.n) {
        if (rec.ws_begin < 0) {
          reinterpret_cast<float*>(rec.out)[col] = s;
        } else {
          workspace[rec.ws_begin + slab * rec.n + col] = s;
        }
      }
    }
    __syncthreads();  // red is reused by the next item
  }
}

// Tensors with several slabs: out[j] = sum over slabs in order (float64). m == 0: zeros.
__global__ void __launch_bounds__(kThreads)
    seeded_colsum_finalize_kernel(const ColsumRecord* __restrict__ recs, const float* __restrict__ workspace) {
  const ColsumRecord rec = load_record(recs + blockIdx.x);
  const int64_t slabs = rec.m > 0 ? (rec.m + rec.rows_per_slab - 1) / rec.rows_per_slab : 0;
  if (slabs == 1) return;  // written directly by seeded_colsum_kernel
  float* const out = reinterpret_cast<float*>(rec.out);
  for (int64_t j = threadIdx.x; j < rec.n; j += kThreads) {
    double s = 0.0;
    for (int64_t sl = 0; sl < slabs; ++sl) s += workspace[rec.ws_begin + sl * rec.n + j];
    out[j] = static_cast<float>(s);
  }
}

}  // namespace

// --- launchers ---------------------------------------------------------------------------------

void seeded_axpby_launch(int device, uintptr_t records, int64_t num_tensors, int64_t num_chunks, uint64_t seed,
                         bool with_rows, bool round, uint64_t rounding_seed, uintptr_t partials, uintptr_t norms,
                         uintptr_t stream) {
  const char* op = "seeded_axpby_";
  check_arg(num_tensors >= 0 && num_tensors <= INT_MAX, op, "num_tensors out of range");
  check_arg(num_chunks >= 0, op, "num_chunks must be >= 0");
  if (num_tensors == 0) return;
  check_arg(records != 0 && norms != 0, op, "records and norms must be device addresses");
  check_arg(num_chunks == 0 || partials != 0, op, "partials must be a device address");
  DeviceGuard guard(device, op);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* recs = reinterpret_cast<const AxpbyRecord*>(records);
  auto* part = reinterpret_cast<double*>(partials);
  const PhiloxKeys ks = philox_keys(seed), rks = philox_keys(rounding_seed);
  const int n = static_cast<int>(num_tensors);
  if (num_chunks > 0) {
#define LORENZA_AXPBY_LAUNCH(ROWS, ROUND)                                                              \
  do {                                                                                                 \
    const unsigned grid = persistent_grid(seeded_axpby_kernel<ROWS, ROUND>, device, num_chunks);       \
    seeded_axpby_kernel<ROWS, ROUND><<<grid, kThreads, 0, s>>>(recs, n, num_chunks, ks, rks, part);    \
  } while (0)
    if (with_rows) {
      if (round) {
        LORENZA_AXPBY_LAUNCH(true, true);
      } else {
        LORENZA_AXPBY_LAUNCH(true, false);
      }
    } else {
      if (round) {
        LORENZA_AXPBY_LAUNCH(false, true);
      } else {
        LORENZA_AXPBY_LAUNCH(false, false);
      }
    }
#undef LORENZA_AXPBY_LAUNCH
    check_cuda(cudaGetLastError(), op, "launch of seeded_axpby_kernel");
  }
  seeded_axpby_norms_kernel<<<static_cast<unsigned>(n), kThreads, 0, s>>>(recs, n, num_chunks, part,
                                                                         reinterpret_cast<float*>(norms));
  check_cuda(cudaGetLastError(), op, "launch of seeded_axpby_norms_kernel");
}

void stochastic_round_launch(int device, uintptr_t records, int64_t num_tensors, int64_t num_chunks, uint64_t seed,
                             uintptr_t stream) {
  const char* op = "stochastic_round_";
  check_arg(num_tensors >= 0 && num_tensors <= INT_MAX, op, "num_tensors out of range");
  check_arg(num_chunks >= 0, op, "num_chunks must be >= 0");
  if (num_tensors == 0 || num_chunks == 0) return;
  check_arg(records != 0, op, "records must be a device address");
  DeviceGuard guard(device, op);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* recs = reinterpret_cast<const RoundRecord*>(records);
  const unsigned grid = persistent_grid(stochastic_round_kernel, device, num_chunks);
  stochastic_round_kernel<<<grid, kThreads, 0, s>>>(recs, static_cast<int>(num_tensors), num_chunks,
                                                     philox_keys(seed));
  check_cuda(cudaGetLastError(), op, "launch of stochastic_round_kernel");
}

void seeded_colsum_launch(int device, uintptr_t records, int64_t num_tensors, int64_t num_items, uint64_t seed,
                          uintptr_t workspace, uintptr_t stream) {
  const char* op = "seeded_colsum";
  check_arg(num_tensors >= 0 && num_tensors <= INT_MAX, op, "num_tensors out of range");
  check_arg(num_items >= 0, op, "num_items must be >= 0");
  if (num_tensors == 0) return;
  check_arg(records != 0, op, "records must be a device address");
  DeviceGuard guard(device, op);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const auto* recs = reinterpret_cast<const ColsumRecord*>(records);
  auto* ws = reinterpret_cast<float*>(workspace);
  const int n = static_cast<int>(num_tensors);
  if (num_items > 0) {
    const unsigned grid = persistent_grid(seeded_colsum_kernel, device, num_items);
    seeded_colsum_kernel<<<grid, kThreads, 0, s>>>(recs, n, num_items, philox_keys(seed), ws);
    check_cuda(cudaGetLastError(), op, "launch of seeded_colsum_kernel");
  }
  seeded_colsum_finalize_kernel<<<static_cast<unsigned>(n), kThreads, 0, s>>>(recs, ws);
  check_cuda(cudaGetLastError(), op, "launch of seeded_colsum_finalize_kernel");
}

}  // namespace gpu
}  // namespace lorenza
