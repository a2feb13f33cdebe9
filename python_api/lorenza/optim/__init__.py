"""Optimizers for memory-efficient fine-tuning: MeZO, MeZO-Adam, AdaZo-SAM, SAM, LOREN, LORENZA,
Lorenza+, GaLore-AdamW.

The mathematics, the choices and the closure protocol are in ``docs/algorithms.md``.
Every optimizer regenerates its noise from ``(probe_seed(seed, step, probe), stream)`` through the
public functions of :mod:`lorenza_kernels` and never stores it.

* :class:`MeZO`, :class:`MeZOAdam`: zeroth-order SGD / Adam with two-sided probes.
* :class:`AdaZoSAM`: AdamW with a zeroth-order SAM ascent, one backward pass per step.
* :class:`SAM`: the two-backward baseline (davda54/sam calling convention).
* :class:`Loren`: zeroth-order with a learned low-rank perturbation covariance.
* :class:`Lorenza`, :class:`LorenzaPlus`: AdaZo-SAM with Adam and the probes in a rank-r gradient
  subspace (Lorenza+ adds back the orthogonal part of the gradient).
* :class:`GaLoreAdamW`: projected Adam, a drop-in replacement of ``galore_torch.GaLoreAdamW``.
* :func:`make_closure`: a correct closure from a loss function (a Hugging Face ``ModelOutput`` is
  a loss); :func:`probe_seed`: the seed of any probe of any step, to regenerate its noise.
* :func:`param_groups`, :func:`make_optimizer`, :func:`trainer_optimizer`: groups and optimizers
  from a model and ``target_modules`` (names, regexes, "all-linear"), as the Hugging Face Trainer
  reads ``optim_target_modules`` (:mod:`.groups`).
* :class:`SeededOptimizer`: the base class (groups, seeds and streams, probes, skips, state dict)
  for further optimizers; see its module for how an optimizer is put together.
"""

from __future__ import annotations

from ._base import SeededOptimizer, StepContext
from ._noise import DenseNoise, Perturbation, Slot
from ._seeds import RESERVED_PROBE_BASE, probe_seed, splitmix64
from .adazo_sam import AdaZoSAM
from .closure import make_closure
from .galore import GaLoreAdamW
from .groups import make_optimizer, param_groups, target_parameters, trainer_optimizer
from .loren import Loren
from .lorenza import Lorenza, LorenzaPlus
from .mezo import MeZO, MeZOAdam
from .sam import SAM

__all__ = [
    "RESERVED_PROBE_BASE",
    "AdaZoSAM",
    "GaLoreAdamW",
    "Loren",
    "Lorenza",
    "LorenzaPlus",
    "SeededOptimizer",
    "StepContext",
    "DenseNoise",
    "MeZO",
    "MeZOAdam",
    "Perturbation",
    "SAM",
    "Slot",
    "make_closure",
    "make_optimizer",
    "param_groups",
    "target_parameters",
    "trainer_optimizer",
    "probe_seed",
    "splitmix64",
]
