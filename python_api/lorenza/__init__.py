"""lorenza: memory-efficient optimizers for LLM fine-tuning (AdaZo-SAM, LORENZA, LOREN, MeZO).

The optimizers live in :mod:`lorenza.optim`; they call the GPU kernels only through the public
functions of :mod:`lorenza_kernels`.
"""

from __future__ import annotations

from . import optim

__all__ = ["optim"]
__version__ = "0.1.0"
