// C++/OpenMP CPU kernels of the seeded perturbation ops (docs/kernels.md section 1),
// torch-free: they take raw addresses, sizes and dtype codes from lorenza_kernels/cpu/seeded_ops.py.
//
//   seeded_axpby:  t_k <- beta_k t_k + alpha_k z_k (+ gamma_k a_k[i mod n_k]) in float32, rounded
//                  once to t_k's dtype; beta_k == 0 never reads t_k; returns sum(z_k^2) per tensor.
//                  With a rounding seed, bfloat16/float16 results are rounded stochastically.
//   seeded_colsum: column sums of z_k viewed as m_k x n_k, float32 out.
//   stochastic_round: dst_k <- SR(src_k) (float32 src; a plain copy for a float32 dst).
// z_k is the lorenza-philox-v1 stream (seed, streams[k]); stochastic rounding uses the rounding
// stream (rounding seed, streams[k]), one more Philox call per 4 elements (docs/rng.md). Every op
// takes a per-tensor element offset: element i of t_k is stream index offsets[k] + i (a shard of a
// sharded parameter); the rank-one term and the column sums follow t_k's own m x n view.
//
// Determinism: the work is cut into pieces fixed by the shapes alone (kChunk elements, or groups
// of rows for the column sums); each piece writes its own partial sums and those are added in a
// fixed order, so every result is bit-identical for any thread count, and (no FMA contraction,
// see below) for every instruction set.
//
// Portability: the kernels are compiled once per ISA (x86-64 baseline, AVX2, AVX-512) inside
// target-attributed functions and picked at run time from CPUID, so the wheel needs no -march.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

// No a*b+c contraction into FMA in the code below (it is gcc's default, and it is what makes the
// results differ between an FMA and a non-FMA instruction set): every float operation is then a
// correctly rounded IEEE one in a fixed order, so the kernels give the same bits with SSE2, AVX2,
// AVX-512 and the portable path, i.e. on every CPU. Measured cost: about 10% on AVX-512.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif
#include "common/dtype.h"
#include "cpu/convert.h"
#include "cpu/gaussian_tile.h"

namespace py = pybind11;

namespace lorenza {
namespace cpu {
namespace {

// Elements per parallel task of seeded_axpby: a multiple of kTile, so that every task but a
// tensor's last starts and ends on a tile (hence Philox block) boundary.
constexpr int64_t kChunk = int64_t(1) << 16;
static_assert(kChunk % kTile == 0, "chunks must hold whole tiles");
// Column sums: column blocks of at most kColWidth (when n > kColMaxFull), at most kMaxGroups row
// groups, and at most kScratch doubles of per-group partial sums per tensor.
constexpr int64_t kColMaxFull = int64_t(1) << 16;
constexpr int64_t kColWidth = int64_t(1) << 14;
constexpr int64_t kMaxGroups = 64;
constexpr int64_t kScratch = int64_t(1) << 22;

using PhiloxFn = void (*)(const StreamKey&, uint64_t, PhiloxTile&);

struct AxpbyArgs {
  void* data;
  int64_t numel, ncols;
  int64_t offset;    // element i draws stream index offset + i (a shard of a larger tensor)
  int dtype;
  float alpha, beta, gamma;
  const float* row;  // nullptr: no rank-1 term
  StreamKey key;
  bool round;        // round stochastically (16-bit dtypes) with the rounding stream rkey
  StreamKey rkey;
};

// Elements [start, stop) of one tensor; returns their sum(z^2). Element i draws the noise (and the
// rounding word) of stream index offset + i: the loop walks whole tiles of the stream from the tile
// holding index offset + start and keeps the lanes in range (with offset 0 and start a multiple of
// kTile every tile is whole but a tensor's last, as before offsets existed).
template <class D, PhiloxFn P, bool kRound>
LORENZA_CPU_INLINE double axpby_piece(const AxpbyArgs& a, int64_t start, int64_t stop) {
  using S = typename D::storage;
  const float alpha = a.alpha, beta = a.beta, gamma = a.gamma;
  int64_t col = a.row ? start % a.ncols : 0;  // the row term follows the tensor's own index
  alignas(64) float z[kTile];
  alignas(64) float v[kTile];
  alignas(64) uint32_t words[kRound ? kTile : 1];
  double acc[16] = {};
  const int64_t g_begin = a.offset + start, g_end = a.offset + stop;
  for (int64_t g = g_begin & ~static_cast<int64_t>(kTile - 1); g < g_end; g += kTile) {
    gaussian_tile<P>(a.key, static_cast<uint64_t>(g) >> 2, z);
    const int lo = static_cast<int>(std::max<int64_t>(g, g_begin) - g);
    const int hi = static_cast<int>(std::min<int64_t>(g + kTile, g_end) - g);
    S* __restrict t = static_cast<S*>(a.data) + (g - a.offset);  // t[j]: lanes lo <= j < hi only
    // Same float32 operation order as the reference: (t beta) + (z alpha) [+ (a gamma)].
    if (beta == 0.0f) {
      for (int j = lo; j < hi; ++j) v[j] = z[j] * alpha;
    } else {
      for (int j = lo; j < hi; ++j) v[j] = D::load(t[j]) * beta + z[j] * alpha;
    }
    if (a.row) {  // the row vector repeats every ncols elements: add it in contiguous runs
      for (int j = lo; j < hi;) {
        const int run = static_cast<int>(std::min<int64_t>(hi - j, a.ncols - col));
        const float* __restrict r = a.row + col;
        for (int q = 0; q < run; ++q) v[j + q] += r[q] * gamma;
        j += run;
        col += run;
        if (col == a.ncols) col = 0;
      }
    }
    if constexpr (kRound) {
      word_tile<P>(a.rkey, static_cast<uint64_t>(g) >> 2, words);
      for (int j = lo; j < hi; ++j) t[j] = D::store_sr(v[j], words[j]);
    } else {
      for (int j = lo; j < hi; ++j) t[j] = D::store(v[j]);
    }
    for (int j = 0; j < lo; ++j) z[j] = 0.0f;
    for (int j = hi; j < kTile; ++j) z[j] = 0.0f;
    // 16 float lanes over one tile (4 terms each), then into double: vectorizes without
    // reassociation and keeps the chunk's sum accurate to double rounding.
    float lanes[16] = {};
    for (int q = 0; q < kTile / 16; ++q)
      for (int l = 0; l < 16; ++l) lanes[l] += z[16 * q + l] * z[16 * q + l];
    for (int l = 0; l < 16; ++l) acc[l] += lanes[l];
  }
  double s = 0.0;
  for (int l = 0; l < 16; ++l) s += acc[l];
  return s;
}

template <PhiloxFn P>
LORENZA_CPU_INLINE double axpby_piece_any(const AxpbyArgs& a, int64_t start, int64_t stop) {
  switch (a.dtype) {
    case kFloat32:
      return axpby_piece<F32, P, false>(a, start, stop);  // float32 is never rounded
    case kBFloat16:
      return a.round ? axpby_piece<BF16, P, true>(a, start, stop) : axpby_piece<BF16, P, false>(a, start, stop);
    default:
      return a.round ? axpby_piece<F16, P, true>(a, start, stop) : axpby_piece<F16, P, false>(a, start, stop);
  }
}

struct RoundArgs {
  void* dst;
  const float* src;
  int64_t numel;
  int64_t offset;  // element i of the tensor draws the rounding word of index offset + i
  int dtype;
  StreamKey key;   // the rounding stream (word3 = 1)
};

// dst[i] <- SR(src[i]) for i in [start, stop): whole tiles of the stream from the tile holding
// index offset + start on, keeping the words of the indices in range.
template <class D, PhiloxFn P>
LORENZA_CPU_INLINE void round_piece_typed(const RoundArgs& a, int64_t start, int64_t stop) {
  using S = typename D::storage;
  S* __restrict dst = static_cast<S*>(a.dst);
  const float* __restrict src = a.src;
  alignas(64) uint32_t words[kTile];
  const int64_t g_begin = a.offset + start, g_end = a.offset + stop;
  for (int64_t g = g_begin & ~static_cast<int64_t>(kTile - 1); g < g_end; g += kTile) {
    word_tile<P>(a.key, static_cast<uint64_t>(g) >> 2, words);
    const int lo = static_cast<int>(std::max<int64_t>(g, g_begin) - g);
    const int hi = static_cast<int>(std::min<int64_t>(g + kTile, g_end) - g);
    S* __restrict d = dst + (g - a.offset);
    const float* __restrict s = src + (g - a.offset);
    for (int j = lo; j < hi; ++j) d[j] = D::store_sr(s[j], words[j]);
  }
}

template <PhiloxFn P>
LORENZA_CPU_INLINE void round_piece(const RoundArgs& a, int64_t start, int64_t stop) {
  switch (a.dtype) {
    case kFloat32:
      std::copy(a.src + start, a.src + stop, static_cast<float*>(a.dst) + start);
      return;
    case kBFloat16:
      return round_piece_typed<BF16, P>(a, start, stop);
    default:
      return round_piece_typed<F16, P>(a, start, stop);
  }
}

// acc[c] += z_i over elements i in [start, stop), where c counts from 0 at `start` and wraps
// every `period` elements (whole rows: period n; part of a row: period = its width).
template <PhiloxFn P>
LORENZA_CPU_INLINE void colsum_range(const StreamKey& key, int64_t start, int64_t stop, int64_t period,
                                     double* __restrict acc) {
  alignas(64) float z[kTile];
  int64_t col = 0;
  int skip = static_cast<int>(start & 3);  // a row may start inside a Philox block
  for (int64_t i = start, b = start >> 2; i < stop; b += kTileBlocks, skip = 0) {
    gaussian_tile<P>(key, static_cast<uint64_t>(b), z);
    const int n = static_cast<int>(std::min<int64_t>(kTile - skip, stop - i));
    for (int j = 0; j < n;) {
      const int run = static_cast<int>(std::min<int64_t>(n - j, period - col));
      const float* __restrict zz = z + skip + j;
      double* __restrict a = acc + col;
      for (int q = 0; q < run; ++q) a[q] += zz[q];
      j += run;
      col += run;
      if (col == period) col = 0;
    }
    i += n;
  }
}

struct ColsumPlan {
  StreamKey key;
  int64_t offset;  // stream index of element 0
  int64_t m, n, width, col_blocks, rows_per_group, groups;
  float* out;
  double* scratch;  // groups x n partial sums, used when groups > 1
};

// One (row group, column block) piece; acc holds `width` doubles of the calling thread.
template <PhiloxFn P>
LORENZA_CPU_INLINE void colsum_piece(const ColsumPlan& p, int64_t piece, double* acc) {
  const int64_t g = piece / p.col_blocks, c0 = (piece % p.col_blocks) * p.width;
  const int64_t r0 = g * p.rows_per_group, r1 = std::min(p.m, r0 + p.rows_per_group);
  const int64_t w = std::min(p.n, c0 + p.width) - c0;
  std::fill(acc, acc + w, 0.0);
  const int64_t o = p.offset;
  if (w == p.n) {  // whole rows: one contiguous range
    colsum_range<P>(p.key, o + r0 * p.n, o + r1 * p.n, p.n, acc);
  } else {
    for (int64_t r = r0; r < r1; ++r) colsum_range<P>(p.key, o + r * p.n + c0, o + r * p.n + c0 + w, w, acc);
  }
  if (p.groups == 1) {
    for (int64_t j = 0; j < w; ++j) p.out[c0 + j] = static_cast<float>(acc[j]);
  } else {
    std::copy(acc, acc + w, p.scratch + g * p.n + c0);
  }
}

// --- one instantiation per ISA ------------------------------------------------------------------

struct Kernels {
  const char* name;
  double (*axpby)(const AxpbyArgs&, int64_t, int64_t);
  void (*colsum)(const ColsumPlan&, int64_t, double*);
  void (*round)(const RoundArgs&, int64_t, int64_t);
};

double axpby_scalar(const AxpbyArgs& a, int64_t s, int64_t e) { return axpby_piece_any<philox_tile_scalar>(a, s, e); }
void colsum_scalar(const ColsumPlan& p, int64_t i, double* acc) { colsum_piece<philox_tile_scalar>(p, i, acc); }
void round_scalar(const RoundArgs& a, int64_t s, int64_t e) { round_piece<philox_tile_scalar>(a, s, e); }
#ifdef LORENZA_CPU_X86
double axpby_sse2(const AxpbyArgs& a, int64_t s, int64_t e) { return axpby_piece_any<philox_tile_sse2>(a, s, e); }
void colsum_sse2(const ColsumPlan& p, int64_t i, double* acc) { colsum_piece<philox_tile_sse2>(p, i, acc); }
void round_sse2(const RoundArgs& a, int64_t s, int64_t e) { round_piece<philox_tile_sse2>(a, s, e); }
LORENZA_TARGET_AVX2 double axpby_avx2(const AxpbyArgs& a, int64_t s, int64_t e) {
  return axpby_piece_any<philox_tile_avx2>(a, s, e);
}
LORENZA_TARGET_AVX2 void colsum_avx2(const ColsumPlan& p, int64_t i, double* acc) {
  colsum_piece<philox_tile_avx2>(p, i, acc);
}
LORENZA_TARGET_AVX2 void round_avx2(const RoundArgs& a, int64_t s, int64_t e) {
  round_piece<philox_tile_avx2>(a, s, e);
}
LORENZA_TARGET_AVX512 double axpby_avx512(const AxpbyArgs& a, int64_t s, int64_t e) {
  return axpby_piece_any<philox_tile_avx512>(a, s, e);
}
LORENZA_TARGET_AVX512 void colsum_avx512(const ColsumPlan& p, int64_t i, double* acc) {
  colsum_piece<philox_tile_avx512>(p, i, acc);
}
LORENZA_TARGET_AVX512 void round_avx512(const RoundArgs& a, int64_t s, int64_t e) {
  round_piece<philox_tile_avx512>(a, s, e);
}
#endif

// Every instantiation this CPU can run, best first ("scalar" is the portable one).
std::vector<Kernels> supported_kernels() {
  std::vector<Kernels> ks;
#ifdef LORENZA_CPU_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    ks.push_back({"avx512", axpby_avx512, colsum_avx512, round_avx512});
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    ks.push_back({"avx2", axpby_avx2, colsum_avx2, round_avx2});
  ks.push_back({"sse2", axpby_sse2, colsum_sse2, round_sse2});
#endif
  ks.push_back({"scalar", axpby_scalar, colsum_scalar, round_scalar});
  return ks;
}

const std::vector<Kernels>& all_kernels() {
  static const std::vector<Kernels> ks = supported_kernels();
  return ks;
}

std::atomic<int> g_selected{0};  // index into all_kernels(); tests switch it with set_cpu_isa

const Kernels& kernels() { return all_kernels()[g_selected.load(std::memory_order_relaxed)]; }

int threads(int requested, int64_t pieces) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(requested, pieces)));
}

void seeded_axpby(const std::vector<AxpbyArgs>& args, float* norms, int num_threads) {
  const int64_t K = static_cast<int64_t>(args.size());
  std::vector<int64_t> first(K + 1, 0);  // first piece of tensor k
  for (int64_t k = 0; k < K; ++k) first[k + 1] = first[k] + (args[k].numel + kChunk - 1) / kChunk;
  const int64_t pieces = first[K];
  std::vector<double> partial(pieces);
  const Kernels& ks = kernels();
  const auto piece = [&](int64_t c) {
    const int64_t k = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    const int64_t start = (c - first[k]) * kChunk;
    partial[c] = ks.axpby(args[k], start, std::min(start + kChunk, args[k].numel));
  };
  const int nt = threads(num_threads, pieces);
  if (nt == 1) {  // small calls: no OpenMP region to enter (it costs more than the work)
    for (int64_t c = 0; c < pieces; ++c) piece(c);
  } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t c = 0; c < pieces; ++c) piece(c);
  }
  for (int64_t k = 0; k < K; ++k) {
    double s = 0.0;
    for (int64_t c = first[k]; c < first[k + 1]; ++c) s += partial[c];
    norms[k] = static_cast<float>(s);
  }
}

// Every tensor cut into kChunk-element pieces; elementwise, so any split gives the same bits.
void stochastic_round(const std::vector<RoundArgs>& args, int num_threads) {
  const int64_t K = static_cast<int64_t>(args.size());
  std::vector<int64_t> first(K + 1, 0);
  for (int64_t k = 0; k < K; ++k) first[k + 1] = first[k] + (args[k].numel + kChunk - 1) / kChunk;
  const int64_t pieces = first[K];
  const Kernels& ks = kernels();
  const auto piece = [&](int64_t c) {
    const int64_t k = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
    const int64_t start = (c - first[k]) * kChunk;
    ks.round(args[k], start, std::min(start + kChunk, args[k].numel));
  };
  const int nt = threads(num_threads, pieces);
  if (nt == 1) {
    for (int64_t c = 0; c < pieces; ++c) piece(c);
  } else {
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t c = 0; c < pieces; ++c) piece(c);
  }
}

void seeded_colsum(StreamKey key, int64_t offset, int64_t numel, int64_t n, float* out, int num_threads) {
  ColsumPlan p{key, offset, n > 0 ? numel / n : 0, n, 0, 0, 0, 0, out, nullptr};
  if (p.m == 0 || n == 0) {
    std::fill(out, out + n, 0.0f);
    return;
  }
  p.width = n <= kColMaxFull ? n : kColWidth;
  p.col_blocks = (n + p.width - 1) / p.width;
  const int64_t rows_target = std::max<int64_t>(1, kChunk / p.width);
  int64_t groups = std::min({(p.m + rows_target - 1) / rows_target, kMaxGroups, std::max<int64_t>(1, kScratch / n)});
  p.rows_per_group = (p.m + groups - 1) / groups;
  p.groups = (p.m + p.rows_per_group - 1) / p.rows_per_group;
  std::vector<double> scratch(p.groups > 1 ? p.groups * n : 0);
  p.scratch = scratch.data();
  const int64_t pieces = p.groups * p.col_blocks;
  const Kernels& ks = kernels();
#pragma omp parallel num_threads(threads(num_threads, pieces))
  {
    std::vector<double> acc(p.width);  // per thread, not per piece: no page faults per piece
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < pieces; ++i) ks.colsum(p, i, acc.data());
  }
  if (p.groups > 1) {
#pragma omp parallel for schedule(static) num_threads(threads(num_threads, n / 4096 + 1))
    for (int64_t c = 0; c < n; ++c) {
      double s = 0.0;
      for (int64_t g = 0; g < p.groups; ++g) s += p.scratch[g * n + c];
      out[c] = static_cast<float>(s);
    }
  }
}

}  // namespace
}  // namespace cpu

// --- Python bindings ------------------------------------------------------------------------------

namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw py::value_error(msg);
}

template <class T>
void require_len(const std::vector<T>& v, size_t k, const char* name) {
  if (v.size() != k)
    require(false, std::string(name) + ": expected " + std::to_string(k) + " values, got " + std::to_string(v.size()));
}

uint32_t check_stream(int64_t stream, size_t k) {
  if (stream < 0 || stream > 0xFFFFFFFFLL) require(false, "streams[" + std::to_string(k) + "]: must lie in [0, 2**32)");
  return static_cast<uint32_t>(stream);
}

}  // namespace

void bind_seeded_ops_cpu(py::module_& m) {
  using Ptrs = std::vector<uintptr_t>;
  using Ints = std::vector<int64_t>;
  using Floats = std::vector<double>;
  m.def(
      "seeded_axpby_cpu",
      [](const Ptrs& ptrs, const Ints& numels, const std::vector<int>& dtypes, const Ints& ncols, uint64_t seed,
         const Ints& streams, const Floats& alpha, const Floats& beta, const Ptrs& row_ptrs, const Floats& gamma,
         uintptr_t norms_ptr, int num_threads, std::optional<uint64_t> rounding_seed,
         std::optional<Ints> offsets) {
        const size_t K = ptrs.size();
        require_len(numels, K, "numels"), require_len(dtypes, K, "dtypes"), require_len(ncols, K, "ncols");
        if (offsets) require_len(*offsets, K, "offsets");
        require_len(streams, K, "streams"), require_len(alpha, K, "alpha"), require_len(beta, K, "beta");
        require_len(row_ptrs, K, "row_ptrs"), require_len(gamma, K, "gamma");
        require(K == 0 || norms_ptr != 0, "norms_ptr: null");
        std::vector<cpu::AxpbyArgs> args(K);
        for (size_t k = 0; k < K; ++k) {
          // Messages are built only on failure: this runs for every tensor of every call.
          const auto at = [k]() { return "[" + std::to_string(k) + "]"; };
          if (numels[k] < 0) require(false, "numels" + at() + ": negative");
          if (dtypes[k] != kFloat32 && dtypes[k] != kBFloat16 && dtypes[k] != kFloat16)
            require(false, "dtypes" + at() + ": unknown dtype code " + std::to_string(dtypes[k]));
          if (numels[k] != 0 && ptrs[k] == 0) require(false, "ptrs" + at() + ": null");
          if (numels[k] != 0 && !(ncols[k] > 0 && numels[k] % ncols[k] == 0))
            require(false, "ncols" + at() + ": must divide numels" + at());
          // gamma == 0 skips the term, as the reference does (a NaN in the row stays out).
          const bool row = row_ptrs[k] != 0 && gamma[k] != 0.0;
          const uint32_t stream = check_stream(streams[k], k);
          const int64_t offset = offsets ? (*offsets)[k] : 0;
          if (offset < 0 || offset > (int64_t(1) << 62) - numels[k]) require(false, "offsets" + at() + ": out of range");
          args[k] = cpu::AxpbyArgs{reinterpret_cast<void*>(ptrs[k]), numels[k], ncols[k], offset, dtypes[k],
                                   static_cast<float>(alpha[k]), static_cast<float>(beta[k]),
                                   static_cast<float>(gamma[k]),
                                   row ? reinterpret_cast<const float*>(row_ptrs[k]) : nullptr,
                                   cpu::make_key(seed, stream), rounding_seed.has_value() && dtypes[k] != kFloat32,
                                   cpu::make_key(rounding_seed.value_or(0), stream, 1u)};
        }
        py::gil_scoped_release nogil;
        cpu::seeded_axpby(args, reinterpret_cast<float*>(norms_ptr), num_threads);
      },
      py::arg("ptrs"), py::arg("numels"), py::arg("dtypes"), py::arg("ncols"), py::arg("seed"),
      py::arg("streams"), py::arg("alpha"), py::arg("beta"), py::arg("row_ptrs"), py::arg("gamma"),
      py::arg("norms_ptr"), py::arg("num_threads"), py::arg("rounding_seed") = py::none(),
      py::arg("offsets") = py::none(),
      "In place t_k <- beta_k t_k + alpha_k z_k (+ gamma_k row_k[i % ncols_k] where row_ptrs[k] != 0),\n"
      "z_k = stream (seed, streams[k]); float32 math rounded once to dtype (stochastically, with the\n"
      "rounding stream (rounding_seed, streams[k]), for 16-bit dtypes when rounding_seed is given);\n"
      "beta_k == 0 does not read t_k. Writes sum(z_k^2) to the float32[K] at norms_ptr. Row vectors:\n"
      "contiguous float32. offsets[k]: element i of t_k draws stream index offsets[k] + i (default 0).");
  m.def(
      "stochastic_round_cpu",
      [](const Ptrs& dst_ptrs, const Ptrs& src_ptrs, const Ints& numels, const std::vector<int>& dtypes,
         const Ints& offsets, uint64_t seed, const Ints& streams, int num_threads) {
        const size_t K = dst_ptrs.size();
        require_len(src_ptrs, K, "src_ptrs"), require_len(numels, K, "numels"), require_len(dtypes, K, "dtypes");
        require_len(offsets, K, "offsets"), require_len(streams, K, "streams");
        std::vector<cpu::RoundArgs> args(K);
        for (size_t k = 0; k < K; ++k) {
          const auto at = [k]() { return "[" + std::to_string(k) + "]"; };
          if (numels[k] < 0) require(false, "numels" + at() + ": negative");
          if (offsets[k] < 0 || offsets[k] > (int64_t(1) << 62) - numels[k]) require(false, "offsets" + at() + ": out of range");
          if (dtypes[k] != kFloat32 && dtypes[k] != kBFloat16 && dtypes[k] != kFloat16)
            require(false, "dtypes" + at() + ": unknown dtype code " + std::to_string(dtypes[k]));
          if (numels[k] != 0 && (dst_ptrs[k] == 0 || src_ptrs[k] == 0)) require(false, "dst_ptrs, src_ptrs" + at() + ": null");
          args[k] = cpu::RoundArgs{reinterpret_cast<void*>(dst_ptrs[k]), reinterpret_cast<const float*>(src_ptrs[k]),
                                   numels[k], offsets[k], dtypes[k],
                                   cpu::make_key(seed, check_stream(streams[k], k), 1u)};
        }
        py::gil_scoped_release nogil;
        cpu::stochastic_round(args, num_threads);
      },
      py::arg("dst_ptrs"), py::arg("src_ptrs"), py::arg("numels"), py::arg("dtypes"), py::arg("offsets"),
      py::arg("seed"), py::arg("streams"), py::arg("num_threads"),
      "dst_k[i] <- SR(src_k[i]) for the contiguous float32 src_k: stochastic rounding to dtype (a plain\n"
      "copy for float32) with the rounding word of index offsets[k] + i of stream (seed, streams[k]).");
  m.def(
      "seeded_colsum_cpu",
      [](const Ints& numels, const Ints& ncols, uint64_t seed, const Ints& streams, const Ptrs& out_ptrs,
         int num_threads, std::optional<Ints> offsets) {
        const size_t K = numels.size();
        require_len(ncols, K, "ncols");
        if (offsets) require_len(*offsets, K, "offsets");
        require_len(streams, K, "streams");
        require_len(out_ptrs, K, "out_ptrs");
        for (size_t k = 0; k < K; ++k) {
          check_stream(streams[k], k);
          const std::string at = "[" + std::to_string(k) + "]";
          require(numels[k] >= 0 && ncols[k] >= 0, "numels" + at + ", ncols" + at + ": negative");
          require(ncols[k] == 0 ? numels[k] == 0 : numels[k] % ncols[k] == 0,
                  "ncols" + at + ": must divide numels" + at);
          require(ncols[k] == 0 || out_ptrs[k] != 0, "out_ptrs" + at + ": null");
          if (offsets)
            require((*offsets)[k] >= 0 && (*offsets)[k] <= (int64_t(1) << 62) - numels[k], "offsets" + at + ": out of range");
        }
        py::gil_scoped_release nogil;
        for (size_t k = 0; k < K; ++k)
          cpu::seeded_colsum(cpu::make_key(seed, static_cast<uint32_t>(streams[k])), offsets ? (*offsets)[k] : 0,
                             numels[k], ncols[k], reinterpret_cast<float*>(out_ptrs[k]), num_threads);
      },
      py::arg("numels"), py::arg("ncols"), py::arg("seed"), py::arg("streams"), py::arg("out_ptrs"),
      py::arg("num_threads"), py::arg("offsets") = py::none(),
      "Column sums of z_k (stream (seed, streams[k]), element i at stream index offsets[k] + i) viewed as\n"
      "(numels_k / ncols_k) x ncols_k, written to the float32[ncols_k] at out_ptrs[k].");
  m.def(
      "cpu_isas", []() {
        std::vector<std::string> names;
        for (const auto& k : cpu::all_kernels()) names.emplace_back(k.name);
        return names;
      },
      "Instruction sets the CPU kernels can use on this machine, the default first.");
  m.def(
      "cpu_isa", []() { return std::string(cpu::kernels().name); }, "Instruction set the CPU kernels use now.");
  m.def(
      "set_cpu_isa",
      [](const std::string& name) {
        const auto& ks = cpu::all_kernels();
        for (size_t i = 0; i < ks.size(); ++i) {
          if (name == ks[i].name || (name == "auto" && i == 0)) {
            cpu::g_selected.store(static_cast<int>(i));
            return std::string(ks[i].name);
          }
        }
        throw py::value_error("set_cpu_isa: " + name + " is not supported here");
      },
      py::arg("name"), "Force an instruction set of cpu_isas() ('auto': the best); for tests and benchmarks.");
}

}  // namespace lorenza
