// lorenza_kernels._C: one torch-free pybind11 module. Each op's source defines a bind_* function
// that adds its kernels (CPU always, CUDA launchers when built with LORENZA_WITH_CUDA). Functions
// take raw addresses (ints), sizes and, for CUDA, the stream as an integer; the Python side
// (lorenza_kernels/cpu, lorenza_kernels/cuda) validates tensors before calling them.
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace lorenza {
void bind_seeded_ops_cpu(py::module_& m);
#ifdef LORENZA_WITH_CUDA
void bind_seeded_ops_cuda(py::module_& m);
#endif
}  // namespace lorenza

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorenza_kernels compiled kernels (CPU: C++/OpenMP; CUDA when built with it)";
  m.def("has_cuda", []() {
#ifdef LORENZA_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("openmp_max_threads", []() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  lorenza::bind_seeded_ops_cpu(m);
#ifdef LORENZA_WITH_CUDA
  lorenza::bind_seeded_ops_cuda(m);
#endif
}
