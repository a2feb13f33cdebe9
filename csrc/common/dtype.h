// Element dtypes the kernels accept, as the codes passed from Python (lorenza_kernels/_dtypes.py
// keeps the same table). The float32 <-> bfloat16 / float16 conversions are per backend:
// csrc/cpu/convert.h (branch-free, vectorizable) and csrc/cuda/unit_io.cuh (the CUDA intrinsics).
#pragma once

namespace lorenza {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace lorenza
