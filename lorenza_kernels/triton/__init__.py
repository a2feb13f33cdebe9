"""Triton backend, registered for device type ``cuda`` (and ``cpu`` under ``TRITON_INTERPRET=1``)."""

from __future__ import annotations

import importlib.util
import os

AVAILABLE = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: Device types the Triton kernels are registered for.
DEVICE_TYPES: tuple[str, ...] = ("cuda", "cpu") if INTERPRET else ("cuda",)

if AVAILABLE:
    from . import projected_adam, rsvd, seeded_ops  # noqa: F401
