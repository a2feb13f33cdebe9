"""Whether the Triton backend can run here, and for which device types it registers its kernels."""

from __future__ import annotations

import importlib.util
import os

import torch

AVAILABLE = importlib.util.find_spec("triton") is not None
#: ``TRITON_INTERPRET=1``: Triton runs its kernels on the CPU through numpy (tests).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: Device types the Triton kernels are registered for.
DEVICE_TYPES: tuple[str, ...] = ("cuda", "cpu") if INTERPRET else ("cuda",)
#: Whether to import and register the kernels at all: a CPU-only torch can only run them in the
#: interpreter, and importing Triton costs a few hundred milliseconds.
ENABLED = AVAILABLE and (INTERPRET or torch.version.cuda is not None or torch.version.hip is not None)
