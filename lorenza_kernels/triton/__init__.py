"""Triton backend, registered for the ``CUDA`` dispatch key (and ``CPU`` under ``TRITON_INTERPRET=1``).

The kernels are imported only where they can run (``_env.ENABLED``): a CUDA or ROCm build of torch,
or the interpreter.
"""

from __future__ import annotations

from ._env import AVAILABLE, DEVICE_TYPES, ENABLED, INTERPRET

__all__ = ["AVAILABLE", "DEVICE_TYPES", "ENABLED", "INTERPRET"]

if ENABLED:
    from . import projected_adam, rsvd, seeded_linear, seeded_ops  # noqa: F401
