"""Driving ``optimizer.step(closure)`` from training loops.

- :mod:`lorenza.integrations.loop`: a plain PyTorch loop (:func:`closure_step`), used by the rest.
- :mod:`lorenza.integrations.hf`: :class:`LorenzaTrainer`, a Hugging Face ``Trainer`` whose every
  step is ``optimizer.step(closure)`` (imported on first use: needs ``transformers``).

A PyTorch Lightning example (untested here) is in ``examples/lightning_closure.py``.
"""

from __future__ import annotations

from .loop import PassCounter, StepClosure, closure_step

__all__ = ["LorenzaTrainer", "PassCounter", "StepClosure", "closure_step"]


def __getattr__(name: str):
    if name == "LorenzaTrainer":
        from .hf import LorenzaTrainer

        return LorenzaTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
