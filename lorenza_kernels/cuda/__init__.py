"""CUDA backend: the CUDA C++ kernels of ``_C``, registered for device type ``cuda``.

Nothing here touches the GPU at import: registering only records functions.
"""

from .._ext import has_cuda_kernels

if has_cuda_kernels():
    from . import seeded_ops  # noqa: F401
