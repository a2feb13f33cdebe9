"""Seeded noise on lists of tensors with fixed stream numbers, through ``lorenza_kernels`` only.

Every parameter of an optimizer owns a fixed stream (its position in the optimizer's parameter
order). ``lorenza_kernels.seeded_axpby_`` draws stream ``first_stream + k`` for tensor ``k`` of its
list, so a list whose streams are not consecutive (frozen parameters in between, a subset of the
parameters, several devices) is cut into runs of consecutive streams on one device, one kernel
call per run. A non-contiguous tensor gets its own run through a contiguous copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

import lorenza_kernels as lk

__all__ = ["Perturbation", "Slot", "iter_runs", "per_slot", "seeded_axpby_streams_"]


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
    out = [float(v) for v in value]
    if len(out) != n:
        raise ValueError(f"{name}: expected {n} values, got {len(out)}")
    return out


def iter_runs(tensors: Sequence[torch.Tensor], streams: Sequence[int]) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` ranges of consecutive streams on one device, all contiguous."""
    start, n = 0, len(tensors)
    while start < n:
        stop = start + 1
        if tensors[start].is_contiguous():
            while (
                stop < n
                and streams[stop] == streams[stop - 1] + 1
                and tensors[stop].device == tensors[start].device
                and tensors[stop].is_contiguous()
            ):
                stop += 1
        yield start, stop
        start = stop


@torch.no_grad()
def seeded_axpby_streams_(
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

    Returns ``sum(z_k^2)`` per tensor (float32, on the first tensor's device), from the same pass.
    """
    n = len(tensors)
    alphas, betas = per_slot(alpha, n, "alpha"), per_slot(beta, n, "beta")
    gammas = per_slot(gamma, n, "gamma") if gamma is not None else None
    device = tensors[0].device if n else torch.device("cpu")
    out = []
    for start, stop in iter_runs(tensors, streams):
        ts = [t.detach() for t in tensors[start:stop]]
        original = None
        if not ts[0].is_contiguous():
            original, ts = ts[0], [ts[0].contiguous()]
        sq = lk.seeded_axpby_(
            ts,
            seed,
            alphas[start:stop],
            betas[start:stop],
            first_stream=int(streams[start]),
            row_vectors=list(row_vectors[start:stop]) if row_vectors is not None else None,
            gamma=gammas[start:stop] if gammas is not None else None,
        )
        if original is not None:
            original.copy_(ts[0])
        out.append(sq.to(device))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float32, device=device)


class Perturbation:
    """The seeded noise currently added to the parameters, kept as integers and floats only.

    ``terms`` is a list of ``(seed, alphas)``: slot ``i`` holds ``sum_terms alphas[i] z(seed, stream_i)``
    on top of its unperturbed value. :meth:`restore` removes it (all slots, or a subset: the
    per-layer hooks restore one parameter as soon as its gradient is ready), in the reverse order
    of application, through the optimizer's ``_apply_noise_`` so that a subclass that perturbs in
    another way (LORENZA's subspace probes) is undone the same way. Restoring is exact up to the
    rounding of the additions, as algorithms.md states.
    """

    def __init__(self, optimizer, slots: Sequence[Slot]):
        self.optimizer = optimizer
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
                self.optimizer._apply_noise_([self.slots[i] for i in live], seed, [-alphas[i] for i in live])
        for i in todo:
            self.restored[i] = True
