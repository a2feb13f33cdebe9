// pybind11 bindings of the CUDA seeded ops (compiled by the host compiler, only in CUDA builds).
// The functions take device addresses and the stream as integers; lorenza_kernels/cuda/seeded_ops.py
// validates the tensors, builds the tables and owns every buffer.
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>

#include "cuda/seeded_ops.h"

namespace py = pybind11;

namespace lorenza {
namespace {

using gpu::AxpbyRecord;
using gpu::ColsumRecord;
using gpu::FieldDesc;
using gpu::RoundRecord;

#define LORENZA_FIELD(T, name, fmt) FieldDesc{#name, offsetof(T, name), fmt}

const FieldDesc kAxpbyFields[] = {
    LORENZA_FIELD(AxpbyRecord, data, "<u8"),        LORENZA_FIELD(AxpbyRecord, row, "<u8"),
    LORENZA_FIELD(AxpbyRecord, numel, "<i8"),       LORENZA_FIELD(AxpbyRecord, ncols, "<i8"),
    LORENZA_FIELD(AxpbyRecord, chunk_begin, "<i8"), LORENZA_FIELD(AxpbyRecord, alpha, "<f4"),
    LORENZA_FIELD(AxpbyRecord, beta, "<f4"),        LORENZA_FIELD(AxpbyRecord, gamma, "<f4"),
    LORENZA_FIELD(AxpbyRecord, stream, "<u4"),      LORENZA_FIELD(AxpbyRecord, dtype, "<i4"),
    LORENZA_FIELD(AxpbyRecord, read_t, "<i4"),      LORENZA_FIELD(AxpbyRecord, offset, "<i8"),
};

const FieldDesc kColsumFields[] = {
    LORENZA_FIELD(ColsumRecord, out, "<u8"),           LORENZA_FIELD(ColsumRecord, m, "<i8"),
    LORENZA_FIELD(ColsumRecord, n, "<i8"),             LORENZA_FIELD(ColsumRecord, item_begin, "<i8"),
    LORENZA_FIELD(ColsumRecord, ws_begin, "<i8"),      LORENZA_FIELD(ColsumRecord, col_tiles, "<i8"),
    LORENZA_FIELD(ColsumRecord, rows_per_slab, "<i8"), LORENZA_FIELD(ColsumRecord, stream, "<u4"),
    LORENZA_FIELD(ColsumRecord, tc_log2, "<i4"),       LORENZA_FIELD(ColsumRecord, offset, "<i8"),
};

const FieldDesc kRoundFields[] = {
    LORENZA_FIELD(RoundRecord, dst, "<u8"),         LORENZA_FIELD(RoundRecord, src, "<u8"),
    LORENZA_FIELD(RoundRecord, numel, "<i8"),       LORENZA_FIELD(RoundRecord, chunk_begin, "<i8"),
    LORENZA_FIELD(RoundRecord, stream, "<u4"),      LORENZA_FIELD(RoundRecord, dtype, "<i4"),
    LORENZA_FIELD(RoundRecord, offset, "<i8"),
};

#undef LORENZA_FIELD

template <size_t N>
py::dict record_layout(const FieldDesc (&fields)[N], size_t itemsize) {
  py::dict out, offsets;
  for (const FieldDesc& f : fields) offsets[f.name] = py::make_tuple(f.offset, f.format);
  out["itemsize"] = itemsize;
  out["fields"] = offsets;
  return out;
}

}  // namespace

void bind_seeded_ops_cuda(py::module_& m) {
  m.def(
      "seeded_ops_cuda_layout",
      []() {
        py::dict d;
        d["threads"] = gpu::kThreads;
        d["unit_bytes"] = gpu::kUnitBytes;
        d["chunk_units"] = gpu::kChunkUnits;
        d["colsum_tc_log2_cap"] = gpu::kColsumTcLog2Cap;
        d["colsum_max_slabs"] = gpu::kColsumMaxSlabs;
        d["colsum_min_rows_per_thread"] = gpu::kColsumMinRowsPerThread;
        d["axpby_record"] = record_layout(kAxpbyFields, sizeof(AxpbyRecord));
        d["colsum_record"] = record_layout(kColsumFields, sizeof(ColsumRecord));
        d["round_record"] = record_layout(kRoundFields, sizeof(RoundRecord));
        return d;
      },
      "Constants and record layouts of the CUDA seeded ops (for the Python table builders).");

  m.def(
      "seeded_axpby_cuda",
      [](int device, uintptr_t records, int64_t num_tensors, int64_t num_chunks, uint64_t seed, bool with_rows,
         uintptr_t partials, uintptr_t norms, uintptr_t stream, bool round, uint64_t rounding_seed) {
        py::gil_scoped_release release;
        gpu::seeded_axpby_launch(device, records, num_tensors, num_chunks, seed, with_rows, round, rounding_seed,
                                 partials, norms, stream);
      },
      py::arg("device"), py::arg("records"), py::arg("num_tensors"), py::arg("num_chunks"), py::arg("seed"),
      py::arg("with_rows"), py::arg("partials"), py::arg("norms"), py::arg("stream"), py::arg("round") = false,
      py::arg("rounding_seed") = 0,
      "Enqueue seeded_axpby_ on `stream` (cudaStream_t as int) for the AxpbyRecord table at `records`;\n"
      "with `round`, 16-bit tensors are rounded stochastically with the rounding stream of rounding_seed.");

  m.def(
      "stochastic_round_cuda",
      [](int device, uintptr_t records, int64_t num_tensors, int64_t num_chunks, uint64_t seed, uintptr_t stream) {
        py::gil_scoped_release release;
        gpu::stochastic_round_launch(device, records, num_tensors, num_chunks, seed, stream);
      },
      py::arg("device"), py::arg("records"), py::arg("num_tensors"), py::arg("num_chunks"), py::arg("seed"),
      py::arg("stream"), "Enqueue stochastic_round_ on `stream` for the RoundRecord table at `records`.");

  m.def(
      "seeded_colsum_cuda",
      [](int device, uintptr_t records, int64_t num_tensors, int64_t num_items, uint64_t seed, uintptr_t workspace,
         uintptr_t stream) {
        py::gil_scoped_release release;
        gpu::seeded_colsum_launch(device, records, num_tensors, num_items, seed, workspace, stream);
      },
      py::arg("device"), py::arg("records"), py::arg("num_tensors"), py::arg("num_items"), py::arg("seed"),
      py::arg("workspace"), py::arg("stream"),
      "Enqueue seeded_colsum on `stream` for the ColsumRecord table at `records`.");
}

}  // namespace lorenza
