"""CPU backend: the C++/OpenMP kernels of ``_C``, registered for device type ``cpu``."""

from .._ext import has_cpu_kernels

if has_cpu_kernels():
    from . import seeded_ops  # noqa: F401

# Pure-torch CPU paths need no extension: they register whether or not _C was built.
from . import projected_adam  # noqa: E402,F401
