"""lorenza_kernels: seeded-perturbation, projected-Adam and randomized-SVD kernels for PyTorch.

Every op lives in the ``torch.ops.lorenza_kernels`` namespace and is dispatched by torch: a
pure-PyTorch reference defines its meaning and runs on any device, faster backends are registered
for the CPU (C++/OpenMP) and CUDA (CUDA C++ or Triton) dispatch keys. :func:`backend_info` tells
which are active; :func:`use_backend` or the environment variable ``LORENZA_KERNELS_BACKEND`` forces
one. The contracts are in ``docs/kernels.md``, the Gaussian stream in ``docs/rng.md``.
"""

from __future__ import annotations

import warnings

from . import _ext, _ops, _registry, cpu, cuda, reference, triton  # noqa: F401  (the schemas, then the reference)  # noqa: F401  (each records its kernels where it can run)
from ._registry import available as available_backends
from ._registry import use_backend
from ._shapes import MODES, SIDES, matrix_dims, projection_side
from .projected_adam import moment_transform_, projected_adam_step_, projected_adam_step_batched_
from .rng import gaussian
from .rsvd import randomized_range, randomized_range_list, randomized_svd, randomized_svd_list
from .seeded_linear import seeded_linear
from .seeded_ops import seeded_axpby_, seeded_colsum, seeded_loren_stats, stochastic_round_

__all__ = [
    "MODES",
    "SIDES",
    "available_backends",
    "backend_info",
    "gaussian",
    "matrix_dims",
    "moment_transform_",
    "projected_adam_step_",
    "projected_adam_step_batched_",
    "projection_side",
    "randomized_range",
    "randomized_range_list",
    "randomized_svd",
    "randomized_svd_list",
    "seeded_axpby_",
    "seeded_colsum",
    "seeded_linear",
    "seeded_loren_stats",
    "stochastic_round_",
    "use_backend",
]
__version__ = "0.1.0"

_registry.install(_registry.env_backend())


def backend_info() -> dict:
    """Which backends are active: the extension, its CPU and CUDA kernels, Triton, the forced one,
    the backends per op and device type in the order tried, and the one torch runs now."""
    return {
        "extension": _ext._C is not None,
        "extension_error": _ext.error,
        "cpu_kernels": _ext.has_cpu_kernels(),
        "cuda_kernels": _ext.has_cuda_kernels(),
        "triton": triton.AVAILABLE,
        "triton_enabled": triton.ENABLED,
        "triton_interpret": triton.INTERPRET,
        "forced": _registry.forced_backend(),
        "ops": _registry.available(),
        "active": {op: {dev: _registry.active(op, dev) for dev in _registry.DISPATCH_KEYS} for op in _ops.SCHEMAS},
    }


if _ext._C is None:
    warnings.warn(
        f"lorenza_kernels: compiled extension unavailable ({_ext.error}); every op runs the pure-PyTorch reference",
        RuntimeWarning,
        stacklevel=2,
    )
