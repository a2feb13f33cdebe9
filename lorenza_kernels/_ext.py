"""The compiled extension ``lorenza_kernels._C`` (torch-free pybind11), if it was built.

``_C`` holds the C++/OpenMP CPU kernels always, and the CUDA kernels with their launchers when it
was built with CUDA (``_C.has_cuda()``). Its functions take raw pointers, sizes and, for CUDA, the
stream as an integer; the Python modules in ``lorenza_kernels.cpu`` and ``lorenza_kernels.cuda``
validate tensors, pass those, and register the functions as the CPU and CUDA implementations.
"""

from __future__ import annotations

import importlib
import os

_C = None
error: str | None = None

if os.environ.get("LORENZA_KERNELS_NO_EXT", "") not in ("", "0"):
    error = "disabled by LORENZA_KERNELS_NO_EXT"
else:
    try:
        _C = importlib.import_module("lorenza_kernels._C")
    except ImportError as exc:  # built without the extension, or a broken build
        error = f"{type(exc).__name__}: {exc}"


def has_cpu_kernels() -> bool:
    return _C is not None


def has_cuda_kernels() -> bool:
    return _C is not None and bool(_C.has_cuda())
