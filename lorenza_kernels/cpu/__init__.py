"""CPU backend, registered for device type ``cpu``: the C++/OpenMP kernels of ``_C`` and the
pure-torch fast paths (BLAS-bound ops need no extension and register whether or not _C exists)."""

from .._ext import has_cpu_kernels
from . import projected_adam  # noqa: F401

if has_cpu_kernels():
    from . import seeded_ops  # noqa: F401  (first: rsvd draws its sketch from it)
    from . import rsvd  # noqa: F401
