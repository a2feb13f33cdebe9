"""Seeded noise on the parameters, through ``lorenza_kernels`` only, and the record of what is applied.

Every parameter of an optimizer owns a fixed stream (its position in the optimizer's parameter
order, ``docs/rng.md``). :func:`seeded_axpby_slots_` applies noise to any subset of the parameters
in one ``lorenza_kernels.seeded_axpby_`` call (the op takes one stream per tensor), one per device
when the parameters live on several.

The objects that apply a probe are components an optimizer holds, not methods it overrides:
:class:`DenseNoise` perturbs the parameters themselves (``p <- beta p + alpha z``);
``_subspace.SubspaceNoise`` perturbs LORENZA's projected matrices inside their subspaces.
A :class:`Perturbation` remembers, as integers and floats only, what was applied, and removes it
through the same component.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch

import lorenza_kernels as lk

__all__ = ["DenseNoise", "Noise", "Perturbation", "Slot", "per_slot", "seeded_axpby_slots_"]


class Slot(NamedTuple):
    """A trainable parameter as one step sees it: the tensor, its fixed stream, its group, and its
    position ``index`` in that step's slot list."""

    param: torch.Tensor
    stream: int
    group: dict
    index: int


def per_slot(value: float | Sequence[float], n: int, name: str = "alpha") -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    if type(value) is list and all(type(v) is float for v in value):
        out = value
    else:
        out = [float(v) for v in value]
    if len(out) != n:
        raise ValueError(f"{name}: expected {n} values, got {len(out)}")
    return out


def seeded_axpby_slots_(
    tensors: Sequence[torch.Tensor],
    streams: Sequence[int],
    seed: int,
    alpha: float | Sequence[float],
    beta: float | Sequence[float] = 1.0,
    *,
    row_vectors: Sequence[torch.Tensor] | None = None,
    gamma: float | Sequence[float] | None = None,
) -> torch.Tensor:
    """``t_k <- beta_k t_k + alpha_k z_k [+ gamma_k 1 a_k^T]`` with ``z_k`` from stream ``streams[k]``.

    One kernel call per device. A non-contiguous tensor (rare for parameters) goes through a
    contiguous copy. Called under ``torch.no_grad()`` by the optimizers (parameters are updated in
    place, not detached: the op refuses tensors that require grad while grad is enabled). Returns
    ``sum(z_k^2)`` per tensor (float32, on the first tensor's device).
    """
    n = len(tensors)
    alphas, betas = per_slot(alpha, n, "alpha"), per_slot(beta, n, "beta")
    gammas = per_slot(gamma, n, "gamma") if gamma is not None else None
    streams = list(streams)
    device = tensors[0].device if n else torch.device("cpu")
    devices = {t.device for t in tensors}
    copies = [k for k, t in enumerate(tensors) if not t.is_contiguous()]
    if len(devices) <= 1 and not copies:  # the usual case: one call, nothing to rearrange
        rows = list(row_vectors) if row_vectors is not None else None
        return lk.seeded_axpby_(list(tensors), seed, alphas, betas, streams=streams, row_vectors=rows, gamma=gammas)
    work = [t.contiguous() if k in copies else t for k, t in enumerate(tensors)]
    norms = torch.empty(n, dtype=torch.float32, device=device)
    for dev in devices:
        idx = [k for k, t in enumerate(work) if t.device == dev]
        sq = lk.seeded_axpby_(
            [work[k] for k in idx],
            seed,
            [alphas[k] for k in idx],
            [betas[k] for k in idx],
            streams=[streams[k] for k in idx],
            row_vectors=[row_vectors[k] for k in idx] if row_vectors is not None else None,
            gamma=[gammas[k] for k in idx] if gammas is not None else None,
        )
        norms[idx] = sq.to(device)
    for k in copies:
        tensors[k].copy_(work[k])
    return norms


class Noise(Protocol):
    """How a probe of one step is applied: ``p <- beta p + alpha P(seed, slot)``; returns ``||P||^2``."""

    def apply_(
        self, slots: Sequence[Slot], seed: int, alpha: Sequence[float], beta: float | Sequence[float] = 1.0
    ) -> torch.Tensor: ...


class DenseNoise:
    """Full-space probes: ``P = z``, drawn from ``(seed, stream of the parameter)``."""

    def apply_(
        self, slots: Sequence[Slot], seed: int, alpha: Sequence[float], beta: float | Sequence[float] = 1.0
    ) -> torch.Tensor:
        return seeded_axpby_slots_([s.param for s in slots], [s.stream for s in slots], seed, alpha, beta)


class Perturbation:
    """The seeded noise currently added to the parameters, kept as integers and floats only.

    ``terms`` is a list of ``(seed, alphas)``: slot ``i`` holds ``sum_terms alphas[i] P(seed, slot_i)``
    on top of its unperturbed value. :meth:`restore` removes it (all slots, or a subset: the
    per-layer hooks restore one parameter as soon as its gradient is ready), in the reverse order
    of application, through the ``noise`` that applied it. Restoring is exact up to the rounding of
    the additions (``docs/algorithms.md``, "Skipped steps").
    """

    def __init__(self, noise: Noise, slots: Sequence[Slot]):
        self.noise = noise
        self.slots = list(slots)
        self.terms: list[tuple[int, list[float]]] = []
        self.restored = [False] * len(self.slots)
        self.index = {id(s.param): s.index for s in self.slots}

    def add(self, seed: int, alphas: Sequence[float]) -> None:
        self.terms.append((seed, [float(a) for a in alphas]))

    def restore(self, indices: Sequence[int] | None = None) -> None:
        todo = [i for i in (range(len(self.slots)) if indices is None else indices) if not self.restored[i]]
        for seed, alphas in reversed(self.terms):
            live = [i for i in todo if alphas[i] != 0.0]
            if live:
                self.noise.apply_([self.slots[i] for i in live], seed, [-alphas[i] for i in live])
        for i in todo:
            self.restored[i] = True
