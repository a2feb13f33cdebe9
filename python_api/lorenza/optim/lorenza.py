"""LORENZA and Lorenza+ (Refael et al., 2025, "LORENZA: Enhancing Generalization in Low-Rank
Gradient LLM Training via Efficient Zeroth-Order Adaptive SAM", https://arxiv.org/abs/2502.19571):
AdaZo-SAM whose matrices run Adam in a rank-r gradient subspace (as GaLore,
https://github.com/jiaweizzhao/GaLore) and whose zeroth-order probes live in that subspace.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from . import _checks, _sharding
from ._adam import adamw_slots_
from ._base import StepContext
from ._noise import Slot
from ._subspace import (
    LOWRANK_GROUP_CHECKS,
    MOMENT_TRANSFORMS,
    PROBE_SPACES,
    SVDS,
    Subspace,
    SubspaceNoise,
    group_default_rank,
    row_split,
)
from .adazo_sam import AdaZoSAM

__all__ = ["Lorenza", "LorenzaPlus"]


class Lorenza(AdaZoSAM):
    r"""LORENZA, ``docs/algorithms.md`` "LORENZA".

    Projected parameters (see :mod:`._subspace`: 2+ dimensions viewed as ``m x n`` with
    ``rank < min(m, n)``) keep a basis ``Q`` (``n x r`` when ``m >= n``, else ``m x r``) and Adam
    moments of ``R``'s shape; every other parameter is AdaZo-SAM's (dense probe, dense AdamW).
    Per step ``t``:

    1. probes ``j < num_probes``: ``U_j = gaussian(R.shape, probe_seed(seed, t, j), stream)``,
       ``P_j = Q U_j`` (left) or ``U_j Q^T`` (right), applied in place by ``W.addmm_`` (never an
       ``m x n`` temporary; all ``U_j`` of one application from one kernel call);
       ``||P_j|| = ||U_j||`` is the norm of the ascent normalisation. Dense parameters use ``z_j``
       exactly as :class:`AdaZoSAM`;
    2. ``eps = rho G / ||G||`` over all parameters, gradient at ``theta + eps``, ``theta -= eps``
       (:class:`AdaZoSAM` steps 1-3, its **choice** for ``q > 1``);
    3. a projected parameter whose ``updates % update_interval == 0`` gets a new basis from this
       gradient (``svd="randomized"``: ``lorenza_kernels``' batched randomized SVD, every such matrix
       in one call, sketch seed ``probe_seed(seed, t, RESERVED_PROBE_BASE)``; ``"exact"``:
       ``torch.linalg.svd`` in float32) and its moments follow ``moment_transform`` ("rotate":
       ``M <- O M``, ``V <- (O*O) V`` with ``O = Q_new^T Q_old``; "keep"; "reset": zeroed and the
       bias correction restarted);
    4. ``W <- W (1 - lr wd) - lr scale lift(N) - lr residual_scale (G - lift(R))`` with ``N`` the
       torch.optim.AdamW direction of ``R = Q^T G`` / ``G Q``: one
       ``lorenza_kernels.projected_adam_step_batched_`` call per bucket of same-shape matrices.

    **choice** (``docs/algorithms.md``): step 1 has no subspace yet; it takes its gradient at ``theta`` (no
    probes, no ascent) and builds the bases from it. A projected parameter that has no basis at a
    later step (added with ``add_param_group``, unfrozen, or without a gradient so far) is not
    probed at that step (its share of the probe and of ``eps`` is zero) and gets its basis from
    that step's gradient. ``rank``, ``update_interval``, ``scale`` and
    ``residual_scale`` are per group (``rank=None``: the group is dense; as in galore-torch, when any
    group names a ``rank``, a group that names none is dense); the rank of a parameter is
    fixed once it has a basis. ``moment_transform``, ``svd``, ``oversample``, ``power_iters`` and
    ``num_probes`` are global and travel in ``state_dict()``.

    Addition to the signature of the brief: ``svd`` (default "randomized", the algorithm's
    choice; "exact" reproduces GaLore's subspace). Deviation for bfloat16/float16 parameters:
    ``Q`` and ``U`` are rounded to the parameter's dtype for the in-place ``addmm_`` of a probe
    (a float32 product would need an ``m x n`` temporary); the update itself is float32 and
    rounded once. The state is float32 whatever the parameters' dtype.

    Memory (``docs/algorithms.md``'s table): ``Q + 2 r max(m, n)`` per projected matrix, AdamW's for
    the rest; during a probe application the ``R``-shaped noise of a bucket of matrices (at most
    ``_functional.BUCKET_NUMEL`` numbers). ``per_layer``, DDP, skips, schedulers and ``state_dict``
    behave as in :class:`AdaZoSAM`.

    FSDP2 (``fully_shard``, ``docs/algorithms.md`` "Distributed training"): supported with
    ``svd="randomized"`` (the default): bases and singular factors from the sharded randomized SVD
    of the row-sharded gradients, never gathered; ``svd="exact"`` is refused.
    """

    group_checks = {**AdaZoSAM.group_checks, **LOWRANK_GROUP_CHECKS, "residual_scale": _checks.non_negative}
    #: FSDP2: supported with svd="randomized" (the sharded randomized SVD), the default.
    sharded_refusal = "svd='exact' runs torch.linalg.svd on each whole gradient; use svd='randomized'"
    global_checks = {"num_probes": 1, "oversample": 0, "power_iters": 0}
    probe_spaces = PROBE_SPACES
    legacy_probe_space = "subspace"

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        rho: float = 0.05,
        mu: float = 1e-3,
        num_probes: int = 1,
        rank: int | None = 128,
        update_interval: int = 200,
        scale: float = 0.25,
        residual_scale: float = 0.0,
        oversample: int = 8,
        power_iters: int = 1,
        moment_transform: str = "rotate",
        svd: str = "randomized",
        seed: int = 0,
        per_layer: bool = False,
        probe: str = "exact",
        probe_space: str = "singular",
        stochastic_rounding: bool = True,
    ) -> None:
        _checks.choice("moment_transform", moment_transform, MOMENT_TRANSFORMS)
        _checks.choice("probe_space", probe_space, self.probe_spaces)
        for key, value in (("oversample", oversample), ("power_iters", power_iters)):
            _checks.int_at_least(key, value, 0)
        _checks.int_at_least("num_probes", num_probes, 1)
        self.group_checks["rank"]("rank", rank)  # checked even when galore-style groups leave it unused
        params, default_rank = group_default_rank(params, rank)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rho=rho, mu=mu, rank=default_rank,
            update_interval=update_interval, scale=scale, residual_scale=residual_scale,
        )  # fmt: skip
        for key, value in defaults.items():
            self.group_checks[key](key, value)
        _checks.choice("svd", svd, SVDS)
        options = {"num_probes": num_probes, "oversample": oversample, "power_iters": power_iters}
        if svd == "randomized":  # FSDP2: the sharded randomized SVD
            self.sharded_refusal = None
        # AdaZoSAM.__init__ would drop the low-rank keys: go straight to SeededOptimizer's.
        super(AdaZoSAM, self).__init__(
            params, defaults, seed=seed, per_layer=per_layer, options=options, probe=probe,
            stochastic_rounding=stochastic_rounding,
        )  # fmt: skip
        self._global.update(moment_transform=moment_transform, svd=svd, probe_space=probe_space)
        self._subspace = Subspace(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        glob = state_dict.get("lorenza") if isinstance(state_dict, dict) else None
        if isinstance(glob, dict):
            _checks.choice("state_dict['lorenza']['moment_transform']", glob.get("moment_transform"), MOMENT_TRANSFORMS)
            _checks.choice("state_dict['lorenza']['svd']", glob.get("svd"), SVDS)
            sharded = any(_sharding.is_dtensor(p) for g in self.param_groups for p in g["params"])
            if sharded and glob["svd"] != "randomized":
                raise ValueError(
                    f"state_dict: svd={glob['svd']!r} was saved, and this optimizer's parameters are sharded (FSDP2): "
                    "only svd='randomized' works on sharded gradients"
                )
        super().load_state_dict(state_dict)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._subspace = Subspace(self)

    def _row_split(self, param: torch.Tensor, key: str, value: torch.Tensor, entry: dict) -> bool | str:
        split = row_split(param, key, entry)
        return super()._row_split(param, key, value, entry) if split is None else split

    def state_bytes(self) -> int:
        """Bytes of every tensor of the optimizer's state (the memory table's "optimizer state")."""
        return self._subspace.state_bytes()

    # --- hooks ----------------------------------------------------------------------------------

    def _context(self, step: int) -> StepContext:
        slots = self._slots()
        plan = self._subspace.plan(slots, step)
        return StepContext(step, slots, SubspaceNoise(self._subspace, plan, self._global["probe_space"]), plan)

    def _wants_ascent(self, ctx: StepContext) -> bool:
        # The documented choice: step 1 has no subspace yet; it takes its gradient at theta.
        return ctx.step > 1 and super()._wants_ascent(ctx)

    def _update(self, ctx: StepContext, slots: Sequence[Slot], grads: Sequence[torch.Tensor]) -> None:
        layouts = ctx.plan.layouts
        dense = [k for k, s in enumerate(slots) if layouts[s.index] is None]
        projected = [k for k, s in enumerate(slots) if layouts[s.index] is not None]
        rseed = self._rounding_seed(ctx.step)
        if dense:
            adamw_slots_(self.state, [slots[k] for k in dense], [grads[k] for k in dense], self.state_dtype,
                         rounding_seed=rseed)  # fmt: skip
        if projected:
            self._subspace.update(
                ctx.plan, [slots[k] for k in projected], [grads[k] for k in projected],
                moment_transform=self._global["moment_transform"],
                adam_scalars=lambda group, step: (float(group["eps"]), float(group["scale"])),
                factors=self._global["probe_space"] == "singular", rounding_seed=rseed,
            )  # fmt: skip


class LorenzaPlus(Lorenza):
    r"""Lorenza+: :class:`Lorenza` plus the part of the gradient orthogonal to the subspace,
    ``- lr residual_scale (G - lift(R))``, folded into the same fused update (no extra memory).

    **choice**: ``residual_scale`` defaults to ``0.1 * scale`` (0.025 with the default scale). The
    subspace step ``lr scale lift(N)`` has entries of size about ``lr scale`` (Adam's direction is
    normalised), while the residual is a plain gradient step of size ``lr residual_scale |G_perp|``.
    A tenth of ``scale`` keeps the residual below a tenth of the subspace step wherever
    ``|G_perp| <= 1`` (the usual regime of fine-tuning gradients, with or without clipping to norm
    1), so it recovers the directions the subspace misses without competing with the Adam step;
    the convergence test checks it trains at least as well as Lorenza. Pass ``residual_scale``
    explicitly to override.
    """

    def __init__(
        self, params: Any, lr: float = 1e-3, *, scale: float = 0.25, residual_scale: float | None = None, **kw: Any
    ) -> None:
        if residual_scale is None:
            _checks.non_negative("scale", scale)
            residual_scale = 0.1 * float(scale)
        super().__init__(params, lr, scale=scale, residual_scale=residual_scale, **kw)
