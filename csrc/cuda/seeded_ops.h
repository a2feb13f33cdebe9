// CUDA seeded perturbation ops (docs/kernels.md section 1): the per-tensor metadata tables and the
// launchers. Plain C++ (no CUDA, no torch headers) so that the pybind11 bindings compile with g++.
//
// The Python side (lorenza_kernels/cuda/seeded_ops.py) builds one table per call, as a numpy
// structured array whose field offsets it reads from `seeded_ops_cuda_layout()` (so the layout
// lives here only), copies it to the device in one H2D copy and passes its address.
#pragma once
#include <cstddef>
#include <cstdint>

namespace lorenza {
namespace gpu {

// Threads per CTA of every kernel here. The reduction trees depend on it, so it is part of the
// results' bit pattern: changing it changes the rounding of the norms and column sums.
constexpr int kThreads = 256;

// seeded_axpby_: the unit of work is 16 bytes of one tensor (4 fp32 or 8 bf16/fp16 elements, i.e.
// 1 or 2 whole Philox blocks when the tensor's element offset is a multiple of 4, else straddling
// blocks), starting at element 0 of the tensor. A chunk is kChunkUnits
// consecutive units of one tensor (32 KiB; the last chunk of a tensor may be short). Each CTA
// writes one float64 partial sum of z^2 per chunk, so the norms do not depend on the grid size.
constexpr int kUnitBytes = 16;
constexpr int kUnitsPerThread = 8;
constexpr int64_t kChunkUnits = static_cast<int64_t>(kThreads) * kUnitsPerThread;

struct AxpbyRecord {
  uint64_t data;         // address of element 0 (any element alignment)
  uint64_t row;          // float32 row vector a_k (ncols values), or 0: no rank-one term
  int64_t numel;         //
  int64_t ncols;         // n of the m x n view: element i is in column i % ncols (>= 1)
  int64_t chunk_begin;   // index of this tensor's first chunk in the launch (prefix sum)
  float alpha, beta, gamma;
  uint32_t stream;       // streams[k]: any stream per tensor
  int32_t dtype;         // DType code (common/dtype.h)
  int32_t read_t;        // 1 when beta_k != 0 (decided in float64): t_k is read
  int64_t offset;        // offsets[k]: element i draws stream index offset + i (noise and rounding)
  int64_t reserved;      //
};
static_assert(sizeof(AxpbyRecord) == 80, "AxpbyRecord must stay 80 bytes");

// seeded_colsum: tensor k is an m x n matrix cut into work items of TC groups of 4 columns x
// rows_per_slab rows (TC = 1 << tc_log2, the TR = kThreads / TC thread rows of a CTA stride over
// the slab's rows). Each item writes one partial per column: straight to `out` when the tensor
// has a single slab, else into the workspace, which a second kernel sums over slabs in order.
constexpr int kColsumTcLog2Cap = 6;         // 64 column groups (256 columns) per item, TR >= 4 ...
                                            // ... raised to 7 / 8 for 2- / 1-row matrices (TR = m)
constexpr int64_t kColsumMaxSlabs = 16;     // bounds the workspace to 16 n floats per tensor
constexpr int64_t kColsumMinRowsPerThread = 64;

struct ColsumRecord {
  uint64_t out;          // float32[n]
  int64_t m, n;          //
  int64_t item_begin;    // index of this tensor's first work item in the launch
  int64_t ws_begin;      // offset (floats) of its slabs x n partials in the workspace, -1 if none
  int64_t col_tiles;     // ceil(ceil(n / 4) / TC)
  int64_t rows_per_slab; // a multiple of TR
  uint32_t stream;       //
  int32_t tc_log2;       //
  int64_t offset;        // offsets[k]: element i of the m x n view is stream index offset + i
  int64_t reserved;      //
};
static_assert(sizeof(ColsumRecord) == 80, "ColsumRecord must stay 80 bytes");

// stochastic_round_: units of 16 bytes of dst (4 fp32 or 8 bf16/fp16 elements, whole Philox blocks
// of the rounding stream) in chunks of kChunkUnits, as seeded_axpby_; src is float32 (16 or 32 bytes
// per unit). A float32 dst gets a plain copy.
struct RoundRecord {
  uint64_t dst;          // address of element 0 of dst (any element alignment)
  uint64_t src;          // float32 values of the same shape
  int64_t numel;         //
  int64_t chunk_begin;   // index of this tensor's first chunk in the launch (prefix sum)
  uint32_t stream;       // streams[k] of the rounding stream
  int32_t dtype;         // DType code of dst
  int64_t offset;        // offsets[k]: element i takes the rounding word offset + i
  uint32_t reserved[4];  //
};
static_assert(sizeof(RoundRecord) == 64, "RoundRecord must stay 64 bytes");

// One field of a record, for the Python mirror: numpy format string ("<u8", "<f4", ...).
struct FieldDesc {
  const char* name;
  size_t offset;
  const char* format;
};

// Launch seeded_axpby_ on `device`/`stream` (a cudaStream_t as an integer) over `num_tensors`
// records (device memory) holding `num_chunks` chunks. `partials` (float64[num_chunks]) is scratch;
// `norms` (float32[num_tensors]) receives sum(z_k^2). With `round`, bfloat16/float16 tensors are
// rounded stochastically with the rounding stream of (rounding_seed, the record's stream).
// Throws std::runtime_error on a CUDA error.
void seeded_axpby_launch(int device, uintptr_t records, int64_t num_tensors, int64_t num_chunks, uint64_t seed,
                         bool with_rows, bool round, uint64_t rounding_seed, uintptr_t partials, uintptr_t norms,
                         uintptr_t stream);

// Launch stochastic_round_ over `num_tensors` RoundRecords holding `num_chunks` chunks.
void stochastic_round_launch(int device, uintptr_t records, int64_t num_tensors, int64_t num_chunks, uint64_t seed,
                             uintptr_t stream);

// Launch seeded_colsum over `num_tensors` records holding `num_items` work items; `workspace` is
// float32 scratch of the size the records' ws_begin ranges need (0 when none needs it).
void seeded_colsum_launch(int device, uintptr_t records, int64_t num_tensors, int64_t num_items, uint64_t seed,
                          uintptr_t workspace, uintptr_t stream);

}  // namespace gpu
}  // namespace lorenza
