"""CPU backend: the C++/OpenMP kernels of ``_C``, registered for device type ``cpu``."""

from .._ext import has_cpu_kernels

if has_cpu_kernels():
    from . import seeded_ops  # noqa: F401

if has_cpu_kernels():
    from . import rsvd  # noqa: F401  (randomized SVD sketch with Omega from the C++ Philox)
