"""lorenza_kernels: seeded-perturbation, projected-Adam and randomized-SVD kernels for PyTorch.

Every op lives in the ``torch.ops.lorenza_kernels`` namespace, has a pure-PyTorch reference that
defines its meaning, and faster backends where they exist (C++/OpenMP on the CPU, CUDA C++ and
Triton on the GPU). :func:`backend_info` tells which are active; :func:`use_backend` or the
environment variable ``LORENZA_KERNELS_BACKEND`` forces one.
"""

from __future__ import annotations

import logging
import warnings

from . import _ext, _ops, _registry, reference  # noqa: F401  (reference registers first)
from . import cpu, cuda, triton  # noqa: F401  (each registers itself when available)
from ._registry import available as available_backends
from ._registry import use_backend
from .projected_adam import moment_transform_, projected_adam_step_, projected_adam_step_batched_
from .rng import gaussian
from .rsvd import randomized_range, randomized_range_list, randomized_svd
from .seeded_ops import seeded_axpby_, seeded_colsum, seeded_loren_stats

__all__ = [
    "available_backends",
    "backend_info",
    "gaussian",
    "moment_transform_",
    "projected_adam_step_",
    "projected_adam_step_batched_",
    "randomized_range",
    "randomized_range_list",
    "randomized_svd",
    "seeded_axpby_",
    "seeded_colsum",
    "seeded_loren_stats",
    "use_backend",
]
__version__ = "0.1.0"

_log = logging.getLogger(__name__)


def backend_info() -> dict:
    """Which backends are active: the extension, its CPU and CUDA kernels, Triton, the forced one,
    and per op and device type the backends in the order they are tried."""
    return {
        "extension": _ext._C is not None,
        "extension_error": _ext.error,
        "cpu_kernels": _ext.has_cpu_kernels(),
        "cuda_kernels": _ext.has_cuda_kernels(),
        "triton": triton.AVAILABLE,
        "triton_interpret": triton.INTERPRET,
        "forced": _registry.forced_backend(),
        "ops": _registry.available(),
    }


if _ext._C is None:
    warnings.warn(
        f"lorenza_kernels: compiled extension unavailable ({_ext.error}); every op runs the "
        "pure-PyTorch reference",
        RuntimeWarning,
        stacklevel=2,
    )
_log.info("lorenza_kernels backends: %s", _registry.available())
