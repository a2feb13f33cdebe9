"""The projected-Adam machinery shared by LORENZA, Lorenza+ and GaLore-AdamW.

Which parameters are projected (``algorithms.md``): a parameter of 2 or more dimensions, viewed as
``m x n`` (``shape[0] x rest``), whose group has ``rank`` r with ``1 <= r < min(m, n)``. Every
other parameter (vectors, norms, biases, matrices with ``min(m, n) <= r``, groups with
``rank=None``) is updated densely by the optimizer's dense rule. **choice**: ``rank >= min(m, n)``
makes that matrix dense rather than an error: a rank-``min(m, n)`` subspace is the whole space,
and dense Adam stores less than ``Q`` plus moments would.

State of a projected parameter (float32, ``algorithms.md``'s memory table: ``Q + 2 r max(m, n)``,
no ``m x n`` buffer):

* ``proj``: the basis ``Q`` (``n x r`` on the right when ``m >= n``, ``m x r`` on the left);
* ``exp_avg``, ``exp_avg_sq``: Adam's moments, of ``R``'s shape (``m x r`` or ``r x n``);
* ``step``: Adam's bias-correction count (restarts at 0 when ``moment_transform="reset"``);
* ``updates``: projected updates taken; the basis is (re)built from the gradient of the update
  with ``updates % update_interval == 0`` (GaLore's ``iter % update_proj_gap == 0``): the first
  one, then every ``update_interval`` updates;
* ``refreshes``: bases built so far.

Refreshes of one step are planned when the step starts (:meth:`LowRankMixin._plan_step`), from
the state alone, so every rank of a distributed job and every resumed run plans the same ones.
Planned matrix ``k`` (parameter order) is sketched from stream ``k`` of
``probe_seed(seed, step, RESERVED_PROBE_BASE)``. Normal mode computes every planned basis in one
``refresh_bases`` call when the first planned parameter is updated (all gradients exist by
then); per-layer mode computes each parameter's basis in its hook from its own gradient, with the
same stream, so both modes agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

import lorenza_kernels as lk

from . import _checks
from ._noise import Slot
from ._seeds import RESERVED_PROBE_BASE, probe_seed
from ._subspace import SVDS, matrix_dims, refresh_bases, subspace_dims

__all__ = ["Layout", "LowRankMixin", "MOMENT_TRANSFORMS"]

MOMENT_TRANSFORMS = ("rotate", "keep", "reset")


def check_rank(name: str, value: Any) -> None:
    if value is not None:
        _checks.int_at_least(name, value, 1)


def check_interval(name: str, value: Any) -> None:
    _checks.int_at_least(name, value, 1)


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


LOWRANK_GROUP_CHECKS: dict[str, _checks.Check] = {
    "rank": check_rank,
    "update_interval": check_interval,
    "scale": _checks.non_negative,
}


class Layout(NamedTuple):
    """How one projected parameter is seen: its ``m x n`` view, side, rank, ``Q``'s and ``R``'s shapes."""

    m: int
    n: int
    side: str
    rank: int
    proj_shape: tuple[int, int]
    moment_shape: tuple[int, int]


@dataclass
class _StepPlan:
    step: int
    slots: list[Slot]
    layouts: dict[int, Layout | None]  # slot.index -> layout (None: dense)
    position: dict[int, int]  # slot.index -> position among the refreshes of this step
    bases: dict[int, torch.Tensor] | None = None  # position -> new basis (normal mode, computed once)
    seed: int = 0


def layout_of(param: torch.Tensor, rank: int | None) -> Layout | None:
    if rank is None or param.dim() < 2:
        return None
    m, n = matrix_dims(param)
    if rank >= min(m, n):
        return None
    side, qshape, rshape = subspace_dims(m, n, rank)
    return Layout(m, n, side, rank, qshape, rshape)


class LowRankMixin:
    """Mixed into a :class:`~lorenza.optim.SeededOptimizer` whose ``_global`` holds ``svd``,
    ``oversample`` and ``power_iters``. The optimizer calls :meth:`_plan_step` when a step starts
    and :meth:`_projected_update` from ``_update_param`` for parameters with a :class:`Layout`;
    it may override :meth:`_adam_scalars` (GaLore-AdamW does, to follow galore-torch)."""

    _step_plan: _StepPlan | None = None

    # --- layout and planning ------------------------------------------------------------------

    def _layout(self, slot: Slot) -> Layout | None:
        lay = layout_of(slot.param, slot.group["rank"])
        state = self.state.get(slot.param, {})
        if state:
            had = state.get("proj")
            if (lay is None) != (had is None) or (had is not None and had.shape != lay.proj_shape):
                was = "dense" if had is None else f"rank {had.shape[1]}"
                now = "dense" if lay is None else f"rank {lay.rank}"
                raise ValueError(
                    f"param_groups: the group 'rank' of a {tuple(slot.param.shape)} parameter changed after its "
                    f"state was built ({was} -> {now}); the rank of a parameter is fixed once it has state"
                )
        return lay

    def _plan_step(self, slots: list[Slot], step: int) -> _StepPlan:
        layouts = {s.index: self._layout(s) for s in slots}
        due = []
        for s in slots:
            if layouts[s.index] is None:
                continue
            state = self.state.get(s.param, {})
            if "proj" not in state or state["updates"] % int(s.group["update_interval"]) == 0:
                due.append(s.index)
        seed = probe_seed(self.seed, step, RESERVED_PROBE_BASE)
        plan = _StepPlan(step, list(slots), layouts, {i: k for k, i in enumerate(due)}, seed=seed)
        self._step_plan = plan
        return plan

    def _svd_kind(self) -> str:
        return self._global["svd"]

    # --- bases --------------------------------------------------------------------------------

    def _new_basis(self, plan: _StepPlan, slot: Slot, grad: torch.Tensor, lay: Layout) -> torch.Tensor:
        pos = plan.position[slot.index]
        opts = dict(
            svd=self._svd_kind(),
            seed=plan.seed,
            oversample=self._global.get("oversample", 8),
            power_iters=self._global.get("power_iters", 1),
        )
        if self.per_layer:  # the other gradients are not alive: this matrix alone, same stream
            G = grad.reshape(lay.m, lay.n)
            return refresh_bases([G], [lay.rank], [lay.side], first_stream=pos, **opts)[0]
        if plan.bases is None:
            plan.bases = {}
            todo = [
                (plan.position[s.index], s) for s in plan.slots if s.index in plan.position and s.param.grad is not None
            ]
            # One call per run of consecutive positions (one call in all when every planned
            # matrix has a gradient), so that matrix k always draws stream k.
            start = 0
            while start < len(todo):
                stop = start + 1
                while stop < len(todo) and todo[stop][0] == todo[stop - 1][0] + 1:
                    stop += 1
                run = todo[start:stop]
                lays = [plan.layouts[s.index] for _, s in run]
                mats = [s.param.grad.reshape(lo.m, lo.n) for (_, s), lo in zip(run, lays)]
                bases = refresh_bases(
                    mats, [lo.rank for lo in lays], [lo.side for lo in lays], first_stream=run[0][0], **opts
                )
                plan.bases.update((k, Q) for (k, _), Q in zip(run, bases))
                start = stop
        return plan.bases.pop(pos)

    # --- the update ---------------------------------------------------------------------------

    def _projected_update(self, slot: Slot, grad: torch.Tensor, lay: Layout, moment_transform: str) -> None:
        plan = self._step_plan
        param, group = slot.param, slot.group
        state = self.state[param]
        if slot.index in plan.position:
            Q = self._new_basis(plan, slot, grad, lay)
            if "proj" not in state:
                state["step"], state["updates"], state["refreshes"] = 0, 0, 0
                state["exp_avg"] = torch.zeros(lay.moment_shape, dtype=torch.float32, device=param.device)
                state["exp_avg_sq"] = torch.zeros(lay.moment_shape, dtype=torch.float32, device=param.device)
            elif moment_transform != "keep":
                lk.moment_transform_(
                    state["exp_avg"], state["exp_avg_sq"], state["proj"], Q, side=lay.side, mode=moment_transform
                )
                if moment_transform == "reset":
                    state["step"] = 0  # bias correction starts over
            state["proj"] = Q
            state["refreshes"] += 1
        state["step"] += 1
        state["updates"] += 1
        beta1, beta2 = group["betas"]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        eps, scale = self._adam_scalars(group, state["step"])
        work = param if param.is_contiguous() else param.contiguous()
        lk.projected_adam_step_(
            work,
            grad if grad.is_contiguous() else grad.contiguous(),
            state["proj"],
            state["exp_avg"],
            state["exp_avg_sq"],
            step=state["step"],
            lr=lr,
            beta1=float(beta1),
            beta2=float(beta2),
            eps=eps,
            weight_decay=wd,
            scale=scale,
            side=lay.side,
            residual_scale=float(group.get("residual_scale", 0.0)),
        )
        if work is not param:
            param.copy_(work)

    def _adam_scalars(self, group: dict, step: int) -> tuple[float, float]:
        """``(eps, scale)`` handed to ``projected_adam_step_`` (torch.optim.AdamW's convention)."""
        return float(group["eps"]), float(group["scale"])

    # --- introspection ------------------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes of every tensor of the optimizer's state (the memory table's "optimizer state")."""
        tensors = [v for st in self.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
        return sum(v.numel() * v.element_size() for v in tensors)


def check_svd(name: str, value: Any) -> str:
    return check_choice(name, value, SVDS)
