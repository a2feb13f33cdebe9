"""CPU backend, registered for the ``CPU`` dispatch key: the C++/OpenMP kernels of ``_C`` and the
pure-torch fast paths (BLAS-bound ops need no extension and register whether or not _C exists)."""

from .._ext import has_cpu_kernels
from . import projected_adam  # noqa: F401

if has_cpu_kernels():
    from . import rsvd, seeded_ops  # noqa: F401
