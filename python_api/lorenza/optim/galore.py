"""GaLore-AdamW (Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", https://arxiv.org/abs/2403.03507): the baseline LORENZA is measured against, a drop-in
replacement of ``galore_torch.GaLoreAdamW`` (https://github.com/jiaweizzhao/GaLore,
``galore_torch/adamw.py`` and ``galore_projector.py``, read for the semantics below, not copied).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from . import _checks, _sharding
from ._adam import adamw_slots_
from ._backward import LayerPass
from ._base import SeededOptimizer, StepContext
from ._functional import galore_adamw_
from ._noise import DenseNoise, Slot
from ._subspace import LOWRANK_GROUP_CHECKS, SVDS, Subspace, group_default_rank, row_split
from .closure import as_loss

__all__ = ["GaLoreAdamW"]

PROJ_TYPES = ("std",)
_UNSUPPORTED_PROJ_TYPES = ("reverse_std", "right", "left", "full")


def _check_proj_type(name: str, value: Any) -> None:
    if value in _UNSUPPORTED_PROJ_TYPES:
        raise ValueError(
            f"{name}: {value!r} is a galore-torch projection this GaLoreAdamW does not implement; only 'std' "
            "(project from the smaller side: right when m >= n) is supported"
        )
    _checks.choice(name, value, PROJ_TYPES)


class GaLoreAdamW(SeededOptimizer):
    r"""GaLore-AdamW, ``docs/algorithms.md`` "GaLore-AdamW": projected Adam, one backward pass, no probes.

    A projected parameter (2+ dimensions viewed as ``m x n``, group ``rank`` r < min(m, n), see
    :mod:`._subspace`) keeps ``Q`` and moments of ``R``'s shape; ``Q`` is rebuilt from the current
    gradient on its 1st, (1 + update_interval)-th, ... update (galore-torch sets its projector at
    ``iter % update_proj_gap == 0`` with ``iter`` the updates taken before, so at the first update)
    and the moments are kept across refreshes (galore-torch). Side rule and ``scale`` as GaLore's
    ``proj_type="std"``. ``svd="exact"``: ``torch.linalg.svd`` of the float32 gradient, as
    galore-torch; ``"randomized"``: ``lorenza_kernels``' batched randomized SVD (every refreshed
    matrix in one call, sketch seed ``probe_seed(seed, step, RESERVED_PROBE_BASE)``).

    The arithmetic follows galore-torch (transformers' old ``AdamW``), not torch.optim.AdamW:
    ``eps`` (default 1e-6) is added to ``sqrt(V)`` before the bias correction, the step size is
    ``lr sqrt(bc2) / bc1``, the bias correction never restarts, and the decoupled weight decay
    ``p <- p - lr wd p`` comes AFTER the update. For a projected parameter this is exactly
    ``projected_adam_step_`` with ``eps / sqrt(bc2)`` and ``scale (1 - lr wd)``; dense parameters
    get the same formula. Parameters and results match galore-torch to rounding (the test checks
    1e-4 relative over 20 steps).

    Groups, and galore-torch's group keys: ``rank``, ``update_proj_gap`` (an alias of
    ``update_interval``), ``scale``, ``proj_type`` (only "std"; the others raise). As in
    galore-torch, when any group passed at construction names a ``rank``, the groups that do not
    are dense (the ``rank`` argument is then unused); otherwise ``rank`` applies to every group.
    ``rank=None`` makes a group dense.

    Deviations from galore-torch: a matrix with ``min(m, n) <= rank`` is dense here (galore-torch
    would store a full orthogonal basis, more memory than AdamW); tensors of more than two
    dimensions are viewed as ``shape[0] x rest``; the state (``Q`` included) is float32 for
    bfloat16/float16 parameters, each update computed in float32 and rounded once (galore-torch
    keeps both in the parameter's dtype); a non-finite gradient skips the step (counted in
    ``skipped_steps``, one warning) instead of writing NaN into the parameters.

    ``step(closure=None)``: like any torch optimizer, after the user's ``loss.backward()``; with a
    closure, gradients are zeroed and the closure (which calls ``backward``) is run with grad
    enabled (``docs/algorithms.md``'s closure protocol), and its loss returned. ``per_layer=True``: each
    parameter is updated and its gradient freed in its post-accumulate-grad hook during the
    user's backward pass (at most one layer's gradient alive). The first hook of a backward opens
    the step (plans refreshes from the state), :meth:`step` closes it: call ``step()`` after every
    backward, and do not accumulate gradients over several backward passes (an error). Every
    backward pass through the model then updates it, as in PyTorch's "optimizer step in
    backward" pattern. Not compatible with ``DistributedDataParallel``'s gradient averaging,
    which runs after the hooks; normal mode is (bases agree across ranks: same averaged gradient,
    same SVD, same sketch seed).

    FSDP2 (``fully_shard``, ``docs/algorithms.md`` "Distributed training"): with ``svd="randomized"``
    each basis comes from the sharded randomized SVD of the row-sharded gradient (never gathered,
    ``_sharded_rsvd.py``), equal to one process's to rounding; ``svd="exact"`` is refused.
    """

    #: FSDP2: with svd="randomized" the bases come from the sharded randomized SVD; "exact" refuses.
    sharded_refusal = "svd='exact' runs torch.linalg.svd on each whole gradient; use svd='randomized'"

    group_checks = {
        **SeededOptimizer.group_checks,
        "betas": _checks.betas,
        "eps": _checks.non_negative,
        **LOWRANK_GROUP_CHECKS,
        "proj_type": _check_proj_type,
    }
    global_checks = {"oversample": 0, "power_iters": 0}

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        rank: int | None = 128,
        update_interval: int = 200,
        scale: float = 0.25,
        svd: str = "exact",
        oversample: int = 8,
        power_iters: int = 1,
        seed: int = 0,
        per_layer: bool = False,
        stochastic_rounding: bool = True,
    ) -> None:
        _checks.choice("svd", svd, SVDS)
        params, default_rank = group_default_rank(params, rank)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=default_rank,
            update_interval=update_interval, scale=scale, proj_type="std",
        )  # fmt: skip
        self.group_checks["rank"]("rank", rank)  # checked even when galore-style groups leave it unused
        options = {"oversample": oversample, "power_iters": power_iters}
        if svd == "randomized":  # FSDP2's sharded parameters: the sharded randomized SVD
            self.sharded_refusal = None
        super().__init__(
            params, defaults, seed=seed, per_layer=per_layer, options=options, stochastic_rounding=stochastic_rounding
        )
        self._global["svd"] = svd
        self._subspace = Subspace(self)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if isinstance(param_group, dict) and "update_proj_gap" in param_group:
            param_group = dict(param_group)
            gap = param_group.pop("update_proj_gap")
            if "update_interval" in param_group and param_group["update_interval"] != gap:
                raise ValueError(
                    f"param_group: 'update_proj_gap' ({gap}) and 'update_interval' ({param_group['update_interval']}) "
                    "are the same option under two names and disagree"
                )
            param_group["update_interval"] = gap
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        glob = state_dict.get("lorenza") if isinstance(state_dict, dict) else None
        if isinstance(glob, dict):
            _checks.choice("state_dict['lorenza']['svd']", glob.get("svd"), SVDS)
            sharded = any(_sharding.is_dtensor(p) for g in self.param_groups for p in g["params"])
            if sharded and glob["svd"] != "randomized":
                raise ValueError(
                    f"state_dict: svd={glob['svd']!r} was saved, and this optimizer's parameters are sharded (FSDP2): "
                    "only svd='randomized' works on sharded gradients"
                )
        super().load_state_dict(state_dict)
        self._gradient_pass.active = None

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._subspace = Subspace(self)

    def _row_split(self, param: torch.Tensor, key: str, value: torch.Tensor, entry: dict) -> bool | str:
        split = row_split(param, key, entry)
        return super()._row_split(param, key, value, entry) if split is None else split

    def state_bytes(self) -> int:
        """Bytes of every tensor of the optimizer's state (the memory table's "optimizer state")."""
        return self._subspace.state_bytes()

    # --- the step -----------------------------------------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        self._check_groups()
        loss = None
        if closure is not None:
            if not callable(closure):
                raise TypeError(f"closure: expected a callable, got {type(closure).__name__}")
            self.zero_grad(set_to_none=True)
            with torch.enable_grad():
                out = closure()
            # the loss of a ModelOutput, a clear error for a non-scalar; None is allowed (GaLore
            # needs only the gradients), as in torch.optim
            loss = None if out is None else as_loss(out)
        with torch.no_grad():
            self._finish_step()
        return loss

    def _finish_step(self) -> None:
        t = self._global["step"] + 1
        if self.per_layer:
            if self._gradient_pass.active is None:  # no gradient arrived since the last step
                self._open_layer_pass()
            layer_pass = self._gradient_pass.close()
            if not layer_pass.ok:
                self._skip("non-finite gradient (per-layer mode: parameters updated before it keep their update)")
        else:
            self._gradient_pass.update_present(self._context(t), None)
        self._global["step"] = t

    # --- hooks ------------------------------------------------------------------------------------

    def _context(self, step: int) -> StepContext:
        slots = self._slots()
        return StepContext(step, slots, DenseNoise(), self._subspace.plan(slots, step))

    def _open_layer_pass(self) -> LayerPass | None:
        # The user's backward drives the per-layer updates: its first gradient opens the step.
        if not self.per_layer:
            return None
        return self._gradient_pass.open(self._context(self._global["step"] + 1))

    def _update(self, ctx: StepContext, slots: Sequence[Slot], grads: Sequence[torch.Tensor]) -> None:
        layouts = ctx.plan.layouts
        dense = [k for k, s in enumerate(slots) if layouts[s.index] is None]
        projected = [k for k, s in enumerate(slots) if layouts[s.index] is not None]
        rseed = self._rounding_seed(ctx.step)
        if dense:
            adamw_slots_(
                self.state, [slots[k] for k in dense], [grads[k] for k in dense], torch.float32, update=galore_adamw_,
                rounding_seed=rseed,
            )  # fmt: skip
        if projected:
            self._subspace.update(
                ctx.plan, [slots[k] for k in projected], [grads[k] for k in projected], moment_transform="keep",
                adam_scalars=self._adam_scalars, rounding_seed=rseed,
            )  # fmt: skip

    def _adam_scalars(self, group: dict, step: int) -> tuple[float, float]:
        # galore-torch: N = sqrt(bc2)/bc1 M / (sqrt(V) + eps) = (M/bc1) / (sqrt(V)/sqrt(bc2) + eps/sqrt(bc2)),
        # and p <- (p - lr scale lift(N)) (1 - lr wd) = p (1 - lr wd) - lr scale (1 - lr wd) lift(N).
        _, beta2 = group["betas"]
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        eps = float(group["eps"]) / math.sqrt(1.0 - float(beta2) ** step)
        decay = 1.0 - lr * wd if wd > 0.0 else 1.0
        return eps, float(group["scale"]) * decay
