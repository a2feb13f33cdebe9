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

Sharded parameters (FSDP2, ``_sharding.py``): a slot's ``data`` is its local shard and ``offset``
the flat index of the shard's first element in the full tensor; the noise of every pass is the
kernels' with ``offsets=[offset]``, so each rank perturbs and updates its rows with the noise the
unsharded tensor has there. Squared norms computed on shards are partial sums (:meth:`partial`
says which), added over the ranks with the probe losses' all-reduce (``_base._reduce``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NamedTuple, Protocol

import torch

import lorenza_kernels as lk

from . import _sharding
from ._probe import ProbeMode, exact_probe_context

__all__ = [
    "DenseNoise",
    "MomentumNoise",
    "Noise",
    "Perturbation",
    "Slot",
    "per_slot",
    "rounds_stochastically",
    "seeded_axpby_slots_",
]


class Slot(NamedTuple):
    """A trainable parameter as one step sees it: the tensor, its fixed stream, its group, its
    position ``index`` in that step's slot list, and for a sharded (FSDP2) parameter its shard."""

    param: torch.Tensor
    stream: int
    group: dict
    index: int
    shard: _sharding.ShardInfo | None = None

    @property
    def data(self) -> torch.Tensor:
        """The tensor the kernels write: the parameter, or this rank's shard of it."""
        return self.param if self.shard is None else self.shard.local

    @property
    def offset(self) -> int:
        """Flat index of ``data``'s first element in the full parameter (0 unless sharded)."""
        return 0 if self.shard is None else self.shard.offset

    @property
    def grad(self) -> torch.Tensor | None:
        """The gradient of ``data`` (the local shard of a sharded gradient)."""
        g = self.param.grad
        return g if g is None or self.shard is None else _sharding.local(g)


def offsets_of(slots: Sequence[Slot]) -> list[int] | None:
    """The kernels' ``offsets=`` for the slots' data: None when no slot is sharded (the fast path)."""
    if all(s.shard is None for s in slots):
        return None
    return [s.offset for s in slots]


LOW_PRECISION = (torch.bfloat16, torch.float16)


def rounds_stochastically(slot: Slot) -> bool:
    """A bfloat16/float16 parameter whose group keeps ``stochastic_rounding`` (default True)."""
    return slot.param.dtype in LOW_PRECISION and bool(slot.group.get("stochastic_rounding", True))


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
    rounding_seed: int | None = None,
    rounds: Sequence[bool] | None = None,
    offsets: Sequence[int] | None = None,
) -> torch.Tensor:
    """``t_k <- beta_k t_k + alpha_k z_k [+ gamma_k 1 a_k^T]`` with ``z_k`` from stream ``streams[k]``
    (from index ``offsets[k]`` on, for shards).

    One kernel call per device. A non-contiguous tensor (rare for parameters) goes through a
    contiguous copy. Called under ``torch.no_grad()`` by the optimizers (parameters are updated in
    place, not detached: the op refuses tensors that require grad while grad is enabled). Returns
    ``sum(z_k^2)`` per tensor (float32, on the first tensor's device). With ``rounding_seed``,
    bfloat16/float16 tensors round stochastically (``docs/kernels.md``), those with ``rounds[k]``
    False (a group that turned stochastic rounding off) to nearest: one more call then.
    """
    n = len(tensors)
    alphas, betas = per_slot(alpha, n, "alpha"), per_slot(beta, n, "beta")
    gammas = per_slot(gamma, n, "gamma") if gamma is not None else None
    streams = list(streams)
    device = tensors[0].device if n else torch.device("cpu")
    copies = [k for k, t in enumerate(tensors) if not t.is_contiguous()]
    if rounding_seed is not None and rounds is not None and not all(rounds):
        keys = [(t.device, bool(r)) for t, r in zip(tensors, rounds)]
    else:
        keys = [(t.device, rounding_seed is not None) for t in tensors]
    if len(set(keys)) <= 1 and not copies:  # the usual case: one call, nothing to rearrange
        rows = list(row_vectors) if row_vectors is not None else None
        rseed = rounding_seed if keys and keys[0][1] else None
        return lk.seeded_axpby_(
            list(tensors), seed, alphas, betas, streams=streams, row_vectors=rows, gamma=gammas, rounding_seed=rseed,
            offsets=offsets,
        )  # fmt: skip
    work = [t.contiguous() if k in copies else t for k, t in enumerate(tensors)]
    norms = torch.empty(n, dtype=torch.float32, device=device)
    for key in dict.fromkeys(keys):
        idx = [k for k in range(n) if keys[k] == key]
        sq = lk.seeded_axpby_(
            [work[k] for k in idx],
            seed,
            [alphas[k] for k in idx],
            [betas[k] for k in idx],
            streams=[streams[k] for k in idx],
            row_vectors=[row_vectors[k] for k in idx] if row_vectors is not None else None,
            gamma=[gammas[k] for k in idx] if gammas is not None else None,
            rounding_seed=rounding_seed if key[1] else None,
            offsets=[offsets[k] for k in idx] if offsets is not None else None,
        )
        norms[idx] = sq.to(device)
    for k in copies:
        tensors[k].copy_(work[k])
    return norms


class Noise(Protocol):
    """How a probe of one step is applied: ``t <- beta t + alpha P(seed, slot)`` on the parameters,
    or on ``out`` (one tensor per slot, of the parameter's shape) when given; returns ``||P||^2``."""

    def apply_(
        self,
        slots: Sequence[Slot],
        seed: int,
        alpha: Sequence[float],
        beta: float | Sequence[float] = 1.0,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor: ...

    def norms(self, slots: Sequence[Slot], seed: int) -> torch.Tensor:
        """``||P(seed, slot)||^2`` per slot, without touching any parameter."""
        ...

    def partial(self, slots: Sequence[Slot]) -> list[bool]:
        """Which of the norms above are this rank's part of a sum over the ranks (sharded slots)."""
        ...


class DenseNoise:
    """Full-space probes: ``P = z``, drawn from ``(seed, stream of the parameter)``."""

    def apply_(
        self,
        slots: Sequence[Slot],
        seed: int,
        alpha: Sequence[float],
        beta: float | Sequence[float] = 1.0,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if out is not None and len(out) == 1 and isinstance(beta, float):  # an exact probe's copy
            # of the whole parameter (a sharded one's all-gathered value), or of a shard
            o = [slots[0].offset] if out[0].numel() != slots[0].param.numel() else None
            return lk.seeded_axpby_(list(out), seed, list(alpha), beta, streams=[slots[0].stream], offsets=o)
        tensors = [s.data for s in slots] if out is None else out
        return seeded_axpby_slots_(tensors, [s.stream for s in slots], seed, alpha, beta, offsets=offsets_of(slots))

    def update_(
        self,
        slots: Sequence[Slot],
        seed: int,
        alpha: Sequence[float],
        beta: float | Sequence[float],
        rounding_seed: int,
    ) -> None:
        """An update pass ``p <- beta p + alpha z`` that rounds low-precision parameters
        stochastically (those whose group keeps ``stochastic_rounding``) with ``rounding_seed``."""
        seeded_axpby_slots_(
            [s.data for s in slots], [s.stream for s in slots], seed, alpha, beta,
            rounding_seed=rounding_seed, rounds=[rounds_stochastically(s) for s in slots], offsets=offsets_of(slots),
        )  # fmt: skip

    def norms(self, slots: Sequence[Slot], seed: int) -> torch.Tensor:
        scratch = [torch.empty_like(s.data, memory_format=torch.contiguous_format) for s in slots]
        return seeded_axpby_slots_(scratch, [s.stream for s in slots], seed, 1.0, 0.0, offsets=offsets_of(slots))

    def partial(self, slots: Sequence[Slot]) -> list[bool]:
        return [s.shard is not None for s in slots]


class MomentumNoise:
    """AdaZo-SAM's ``probe_space="momentum"``: the probe direction is Adam's first moment
    ``P = exp_avg`` of each parameter (zero before its first update), read from the optimizer's
    state; ``seed`` is unused. No noise, no extra memory."""

    def __init__(self, state: dict):
        self.state = state

    def _moments(self, slots: Sequence[Slot]) -> list[torch.Tensor | None]:
        return [_sharding.local(self.state.get(s.param, {}).get("exp_avg")) for s in slots]

    def apply_(
        self,
        slots: Sequence[Slot],
        seed: int,
        alpha: Sequence[float],
        beta: float | Sequence[float] = 1.0,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        n = len(slots)
        betas = per_slot(beta, n, "beta")
        targets = [s.data for s in slots] if out is None else list(out)
        moments = self._moments(slots)
        for t, m, a, b, s in zip(targets, moments, alpha, betas, slots):
            t = t.detach()
            if m is not None and s.shard is not None and s.shard.world > 1 and t.numel() == s.param.numel():
                m = _sharding.gather_full(m, s.shard)  # a sharded parameter's whole copy: its whole moment
            if b != 1.0:
                t.mul_(b)
            if m is not None and a != 0.0:
                t.add_(m.to(t.dtype), alpha=a)
        return self.norms(slots, seed)

    def norms(self, slots: Sequence[Slot], seed: int) -> torch.Tensor:
        device = slots[0].param.device if slots else torch.device("cpu")
        moments = self._moments(slots)
        out = torch.zeros(len(slots), dtype=torch.float32, device=device)
        live = [k for k, m in enumerate(moments) if m is not None]
        if live:
            sq = torch._foreach_norm([moments[k] for k in live], 2, dtype=torch.float32)
            out[live] = torch.stack([x.to(device) for x in sq]).square()
        return out

    def partial(self, slots: Sequence[Slot]) -> list[bool]:
        return [s.shard is not None for s in slots]


class Perturbation:
    """The seeded noise of a step's ascent, kept as integers and floats only.

    ``terms`` is a list of ``(seed, alphas)``: slot ``i`` is perturbed by
    ``sum_terms alphas[i] P(seed, slot_i)``. In place (``exact=False``) the terms have been added to
    the parameters and :meth:`restore` removes them (all slots, or a subset: the per-layer hooks
    restore one parameter as soon as its gradient is ready), in the reverse order of application,
    through the ``noise`` that applied them; exact up to the rounding of the additions. With
    ``exact=True`` nothing was ever written: :meth:`applied` is the context in which functions that
    read a parameter see its perturbed value (``_probe.ProbeMode``), and restoring is a no-op.
    """

    def __init__(self, noise: Noise, slots: Sequence[Slot], *, exact: bool = False):
        self.noise = noise
        self.slots = list(slots)
        self.exact = exact
        self.terms: list[tuple[int, list[float]]] = []
        self.restored = [False] * len(self.slots)
        self.index = {id(s.param): s.index for s in self.slots}

    def add(self, seed: int, alphas: Sequence[float]) -> None:
        self.terms.append((seed, [float(a) for a in alphas]))

    def restore(self, indices: Sequence[int] | None = None) -> None:
        todo = [i for i in (range(len(self.slots)) if indices is None else indices) if not self.restored[i]]
        if not self.exact:
            for seed, alphas in reversed(self.terms):
                live = [i for i in todo if alphas[i] != 0.0]
                if live:
                    self.noise.apply_([self.slots[i] for i in live], seed, [-alphas[i] for i in live])
        for i in todo:
            self.restored[i] = True

    def materializer(self, record: dict[int, torch.Tensor] | None = None):
        """``make(param)``: a new tensor holding the parameter plus this perturbation. With
        ``record``, the first ``||P||^2`` of each unsharded slot is kept there (slot index -> 1-element
        tensor). ``param`` is a slot's parameter or the all-gathered value FSDP2 reads in its place
        (:class:`ProbeTargets`): the copy is then the whole perturbed parameter. A DTensor that no
        FSDP2 module gathers is copied as a DTensor whose shard carries its part of the noise."""
        terms, noise, own = self.terms, self.noise, self.slots
        slots = ProbeTargets(own).by_id

        def make(param: torch.Tensor) -> torch.Tensor:
            slot = slots.get(id(param))
            if slot is None:  # an FSDP2 parameter all-gathered for the first time since: look again
                slots.update(ProbeTargets(own).by_id)
                slot = slots[id(param)]
            out = param.detach().clone(memory_format=torch.contiguous_format)
            data = _sharding.local(out)  # a DTensor parameter read as itself: its shard
            for seed, alphas in terms:
                a = alphas[slot.index]
                if a != 0.0:
                    sq = noise.apply_([slot], seed, [a], out=[data])
                    if record is not None and slot.index not in record and slot.shard is None:
                        record[slot.index] = sq
            return out

        return make

    def applied(self, *, differentiable: bool, linear=None):
        """The context in which the parameters read as perturbed (exact mode; a no-op context in
        place or without terms)."""
        if not self.exact or not self.terms:
            return contextlib.nullcontext()
        mode = ProbeTargets(self.slots).mode(self.materializer(), differentiable=differentiable, linear=linear)
        return exact_probe_context(mode)


class ProbeTargets:
    """The tensors an exact probe perturbs where they are read, each mapped to its slot: every
    slot's parameter and, for a parameter sharded by FSDP2, the all-gathered parameter that the
    module reads in its place during forward and backward (``_sharding.unsharded_alias``).

    FSDP2 creates that tensor at a parameter's first all-gather (then reuses it): a sharded slot
    without one yet is *pending*, and the :class:`ProbeMode` built by :meth:`mode` resolves it when
    it meets a tensor it does not know, until no slot is pending (the first forward only)."""

    def __init__(self, slots: Sequence[Slot]):
        self.by_id: dict[int, Slot] = {}
        self.tensors: list[torch.Tensor] = []
        self.pending: list[Slot] = []
        for s in slots:
            self._add(s.param, s)
            if s.shard is not None and _sharding.fsdp_param(s.param) is not None:
                alias = _sharding.unsharded_alias(s.param)
                if alias is None:
                    self.pending.append(s)
                else:
                    self._add(alias, s)

    def _add(self, t: torch.Tensor, slot: Slot) -> None:
        self.by_id[id(t)] = slot
        self.tensors.append(t)

    def resolve(self) -> list[torch.Tensor]:
        """The all-gathered tensors that appeared since the last call (now tracked)."""
        found, still = [], []
        for s in self.pending:
            alias = _sharding.unsharded_alias(s.param)
            if alias is None:
                still.append(s)
            else:
                self._add(alias, s)
                found.append(alias)
        self.pending = still
        return found

    def mode(self, make, **kwargs) -> ProbeMode:
        return ProbeMode(self.tensors, make, resolver=self if self.pending else None, **kwargs)
