"""AdaZo-SAM (Refael et al., 2025, "LORENZA: Enhancing Generalization in Low-Rank Gradient LLM
Training via Efficient Zeroth-Order Adaptive SAM", https://arxiv.org/abs/2502.19571): AdamW with a
sharpness-aware gradient whose ascent direction is a zeroth-order estimate, one backward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _checks, _sharding
from ._adam import adamw_slots_
from ._base import SeededOptimizer, StepContext
from ._noise import MomentumNoise, Perturbation, Slot
from ._seeds import probe_seed

__all__ = ["AdaZoSAM", "PROBE_SPACES"]

#: AdaZo-SAM's probe directions: "full" (the paper's, z ~ N(0, I) over every parameter) and
#: "momentum" (Adam's first moment: the ascent along it, its sign from the zeroth-order estimate).
PROBE_SPACES = ("full", "momentum")


class AdaZoSAM(SeededOptimizer):
    r"""AdaZo-SAM, ``docs/algorithms.md`` "AdaZo-SAM".

    Per step ``t``, with ``z_j`` drawn from ``(probe_seed(seed, t, j), stream of the parameter)``:

    1. for ``j < q`` (``q = num_probes``): ``c_j = (L(theta + mu z_j) - L(theta - mu z_j)) / (2 mu)``
       (closure under ``torch.no_grad()``; losses averaged over ranks in one all-reduce);
    2. ``G = (1/q) sum_j c_j z_j`` and ``eps = rho G / ||G||`` with the global norm over all the
       optimizer's parameters. **choice** (docs/algorithms.md) for ``q > 1``:
       ``||G||^2 = (1/q^2) sum_j c_j^2 ||z_j||^2``; the ``||z_j||^2`` come from the kernel pass that
       applies ``+mu z_j``. The restore of the last probe and ``+eps``'s last term are one pass;
    3. ``theta += eps``; the closure with grad enabled gives ``g = grad L(theta + eps)``;
       ``theta -= eps`` (regenerated from the seeds, exact up to rounding);
    4. the AdamW step of ``torch.optim.AdamW`` with ``g``, one multi-tensor update per group
       (``_functional.adamw_``).

    ``rho``, ``mu``, ``lr``, ``betas``, ``eps``, ``weight_decay`` are per group. A group's ``mu``
    scales its part of the probe and its ``c_j`` (``(L+ - L-) / (2 mu_group)``, the estimate of that
    group's directional derivative); a group's share of the perturbation is
    ``rho_group G_group / ||G||``. With one ``mu`` and one ``rho`` this is the documented formula.
    When every group has ``rho = 0`` the probes are skipped (they would not move anything) and
    the optimizer is AdamW: bitwise on float32 parameters with float32 state.

    Under ``torch.distributed`` only the probe losses are reduced here (one all-reduce of ``2 q``
    scalars per step); the gradient of the backward pass is expected to be averaged by
    ``DistributedDataParallel``, or reduce-scattered by FSDP2's ``fully_shard``, whose sharded
    parameters each rank probes and updates on its shard (``docs/algorithms.md``, "Distributed
    training").

    ``per_layer=True``: each parameter is restored (its share of ``eps`` removed), checked,
    updated and its gradient freed in its post-accumulate-grad hook, as soon as the backward pass
    has produced it; results equal those of normal mode. Not compatible with
    ``DistributedDataParallel``'s gradient averaging, which runs after the hooks.

    Non-finite probe loss: perturbation removed, no backward pass, skip counted, one warning.
    Non-finite loss or gradient in the backward pass: ``eps`` removed, no update (per-layer mode:
    the parameters updated before the first non-finite gradient keep their update). With the
    default ``probe="exact"`` nothing is ever written, so the parameters are bitwise as before;
    with ``probe="inplace"`` they are restored up to the rounding of adding and subtracting the
    regenerated noise (docs/algorithms.md, "Skipped steps").

    ``probe_space``: ``"full"`` (default, the paper's: ``z ~ N(0, I)`` over every parameter) or
    ``"momentum"`` (one direction, Adam's first moment ``exp_avg``, its sign from the zeroth-order
    estimate; no noise, no memory; ``num_probes=1``). docs/algorithms.md ("AdaZo-SAM") gives the
    measurements behind keeping the paper's default.

    State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq`` (``state_dtype``, float32 by
    default): AdamW's memory. Returns the loss of the backward pass (at ``theta + eps``).
    """

    group_checks = {
        **SeededOptimizer.group_checks,
        "betas": _checks.betas,
        "eps": _checks.non_negative,
        "rho": _checks.non_negative,
        "mu": _checks.positive,
    }
    global_checks = {"num_probes": 1}
    #: the probe directions this class offers (the first is the default), and the one of state
    #: dicts saved before the option existed
    probe_spaces: tuple[str, ...] = PROBE_SPACES
    legacy_probe_space = "full"

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
        seed: int = 0,
        per_layer: bool = False,
        state_dtype: torch.dtype | None = torch.float32,
        probe: str = "exact",
        probe_space: str = "full",
        stochastic_rounding: bool = True,
    ) -> None:
        _checks.choice("probe_space", probe_space, self.probe_spaces)
        if probe_space == "momentum" and num_probes != 1:
            raise ValueError("num_probes: probe_space='momentum' has one direction, so it takes num_probes=1")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rho=rho, mu=mu)
        super().__init__(
            params,
            defaults,
            seed=seed,
            per_layer=per_layer,
            state_dtype=state_dtype,
            options={"num_probes": num_probes},
            probe=probe,
            stochastic_rounding=stochastic_rounding,
        )
        self._global["probe_space"] = probe_space

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        glob = state_dict.get("lorenza") if isinstance(state_dict, dict) else None
        if isinstance(glob, dict):  # saved before the option existed: the probes of that time
            glob = {"probe_space": self.legacy_probe_space, **glob}
            _checks.choice("state_dict['lorenza']['probe_space']", glob["probe_space"], self.probe_spaces)
            state_dict = {**state_dict, "lorenza": glob}
        super().load_state_dict(state_dict)

    def _context(self, step: int) -> StepContext:
        ctx = super()._context(step)
        if self._global["probe_space"] == "momentum":
            ctx.noise = MomentumNoise(self.state)
        return ctx

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:
        closure = self._require_closure(closure)
        ctx = self._context(self._global["step"] + 1)
        perturbation = self._perturbation(ctx)
        if self._wants_ascent(ctx):
            probe_loss = self._ascend(ctx, closure, perturbation)
            if probe_loss is not None:  # skipped: non-finite probe
                self._global["step"] = ctx.step
                _sharding.resync([s.param for s in ctx.slots if s.shard is not None])
                return probe_loss
        loss = self._gradient_pass.run(ctx, closure, perturbation)
        self._global["step"] = ctx.step
        _sharding.resync([s.param for s in ctx.slots if s.shard is not None])
        return loss

    def _wants_ascent(self, ctx: StepContext) -> bool:
        """Whether this step perturbs at all (LORENZA: not at step 1, where it builds its subspace)."""
        return any(float(s.group["rho"]) != 0.0 for s in ctx.slots)

    def _ascend(self, ctx: StepContext, closure: Callable[[], Any], perturbation: Perturbation) -> torch.Tensor | None:
        """Steps 1-3 up to ``theta += eps``, recorded in ``perturbation``. Returns None, or the mean
        probe loss when a probe was non-finite and the step is skipped (parameters restored)."""
        slots = ctx.slots
        q = self._global["num_probes"]
        seeds = [probe_seed(self.seed, ctx.step, j) for j in range(q)]
        mus = [float(s.group["mu"]) for s in slots]
        losses, norms, ok = self._two_sided_probes(ctx, closure, seeds, mus)
        if not ok:
            return torch.tensor(sum(losses) / len(losses))
        c = [[(losses[2 * j] - losses[2 * j + 1]) / (2.0 * mu) for mu in mus] for j in range(q)]
        norm_sq = sum(cj[i] ** 2 * norms[j][i] for j, cj in enumerate(c) for i in range(len(slots))) / q**2
        inv_norm = 1.0 / math.sqrt(norm_sq) if norm_sq > 0.0 else 0.0
        rhos = [float(s.group["rho"]) for s in slots]
        e = [[rho * cji / q * inv_norm for rho, cji in zip(rhos, cj)] for cj in c]
        if perturbation.exact:  # nothing was written: the ascent is read where the parameters are used
            for seed, ej in zip(seeds, e):
                perturbation.add(seed, ej)
            return None
        last = q - 1
        # theta is at theta0 - mu z_last: restore it and add eps's last term in one pass.
        ctx.noise.apply_(slots, seeds[last], [mu + ei for mu, ei in zip(mus, e[last])])
        perturbation.add(seeds[last], e[last])
        for j in range(last):
            ctx.noise.apply_(slots, seeds[j], e[j])
            perturbation.add(seeds[j], e[j])
        return None

    def _update(self, ctx: StepContext, slots: Sequence[Slot], grads: Sequence[torch.Tensor]) -> None:
        adamw_slots_(self.state, slots, grads, self.state_dtype, rounding_seed=self._rounding_seed(ctx.step))
