"""LORENZA and Lorenza+ (Refael et al., 2025, "LORENZA: Enhancing Generalization in Low-Rank
Gradient LLM Training via Efficient Zeroth-Order Adaptive SAM", https://arxiv.org/abs/2502.19571):
AdaZo-SAM whose matrices run Adam in a rank-r gradient subspace (as GaLore,
https://github.com/jiaweizzhao/GaLore) and whose zeroth-order probes live in that subspace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import lorenza_kernels as lk

from . import _checks
from ._base import Slot
from ._lowrank import LOWRANK_GROUP_CHECKS, MOMENT_TRANSFORMS, LowRankMixin, check_choice, check_svd
from ._noise import per_slot
from ._subspace import matrix_dims, side_for
from .adazo_sam import AdaZoSAM

__all__ = ["Lorenza", "LorenzaPlus"]


class Lorenza(LowRankMixin, AdaZoSAM):
    r"""LORENZA, ``algorithms.md`` "LORENZA (the low-rank, memory-efficient AdaZo-SAM)".

    Projected parameters (see :mod:`._lowrank`: 2+ dimensions viewed as ``m x n`` with
    ``rank < min(m, n)``) keep a basis ``Q`` (``n x r`` when ``m >= n``, else ``m x r``) and Adam
    moments of ``R``'s shape; every other parameter is AdaZo-SAM's (dense probe, dense AdamW).
    Per step ``t``:

    1. probes ``j < num_probes``: ``U_j = gaussian(R.shape, probe_seed(seed, t, j), stream)``,
       ``P_j = Q U_j`` (left) or ``U_j Q^T`` (right), applied in place by ``W.addmm_`` (never an
       ``m x n`` temporary); ``||P_j|| = ||U_j||`` is the norm of the ascent normalisation. Dense
       parameters use ``z_j`` exactly as :class:`AdaZoSAM`;
    2. ``eps = rho G / ||G||`` over all parameters, gradient at ``theta + eps``, ``theta -= eps``
       (:class:`AdaZoSAM` steps 1-3, its **choice** for ``q > 1``);
    3. a projected parameter whose ``updates % update_interval == 0`` gets a new basis from this
       gradient (``svd="randomized"``: ``lorenza_kernels``' batched randomized SVD, every such matrix
       in one call, sketch seed ``probe_seed(seed, t, RESERVED_PROBE_BASE)``; ``"exact"``:
       ``torch.linalg.svd`` in float32) and its moments follow ``moment_transform`` ("rotate":
       ``M <- O M``, ``V <- (O*O) V`` with ``O = Q_new^T Q_old``; "keep"; "reset": zeroed and the
       bias correction restarted);
    4. ``W <- W (1 - lr wd) - lr scale lift(N) - lr residual_scale (G - lift(R))`` with ``N`` the
       torch.optim.AdamW direction of ``R = Q^T G`` / ``G Q`` (``lorenza_kernels.projected_adam_step_``).

    **choice** (algorithms.md): step 1 has no subspace yet; it takes its gradient at ``theta`` (no
    probes, no ascent) and builds the bases from it. A projected parameter that has no basis at a
    later step (added with ``add_param_group``, unfrozen, or without a gradient so far) is not
    probed at that step (its share of the probe and of ``eps`` is zero) and gets its basis from
    that step's gradient. ``rank``, ``update_interval``, ``scale`` and
    ``residual_scale`` are per group (``rank=None``: the group is dense); the rank of a parameter is
    fixed once it has a basis. ``moment_transform``, ``svd``, ``oversample``, ``power_iters`` and
    ``num_probes`` are global and travel in ``state_dict()``.

    Addition to the signature of the brief: ``svd`` (default "randomized", the algorithm's
    choice; "exact" reproduces GaLore's subspace). Deviation for bfloat16/float16 parameters:
    ``Q`` and ``U`` are rounded to the parameter's dtype for the in-place ``addmm_`` of a probe
    (a float32 product would need an ``m x n`` temporary); the update itself is float32 and
    rounded once. The state is float32 whatever the parameters' dtype.

    Memory (algorithms.md table): ``Q + 2 r max(m, n)`` per projected matrix, AdamW's for the
    rest; per step one ``R``-shaped noise tensor at a time. ``per_layer``, DDP, skips, schedulers
    and ``state_dict`` behave as in :class:`AdaZoSAM`.
    """

    group_checks = {**AdaZoSAM.group_checks, **LOWRANK_GROUP_CHECKS, "residual_scale": _checks.non_negative}
    global_checks = {"num_probes": 1, "oversample": 0, "power_iters": 0}

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
    ) -> None:
        check_choice("moment_transform", moment_transform, MOMENT_TRANSFORMS)
        for key, value in (("oversample", oversample), ("power_iters", power_iters)):
            _checks.int_at_least(key, value, 0)
        _checks.int_at_least("num_probes", num_probes, 1)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rho=rho, mu=mu, rank=rank,
            update_interval=update_interval, scale=scale, residual_scale=residual_scale,
        )  # fmt: skip
        for key, value in defaults.items():
            self.group_checks[key](key, value)
        check_svd("svd", svd)
        options = {"num_probes": num_probes, "oversample": oversample, "power_iters": power_iters}
        # AdaZoSAM.__init__ would drop the low-rank keys: go straight to SeededOptimizer's.
        super(AdaZoSAM, self).__init__(params, defaults, seed=seed, per_layer=per_layer, options=options)
        self._global.update(moment_transform=moment_transform, svd=svd)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        glob = state_dict.get("lorenza") if isinstance(state_dict, dict) else None
        if isinstance(glob, dict):
            check_choice("state_dict['lorenza']['moment_transform']", glob.get("moment_transform"), MOMENT_TRANSFORMS)
            check_svd("state_dict['lorenza']['svd']", glob.get("svd"))
        super().load_state_dict(state_dict)

    # --- the step -----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:
        closure = self._require_closure(closure)
        self._plan_step(self._slots(), self._global["step"] + 1)
        try:
            return super().step(closure)
        finally:
            self._step_plan = None

    def _wants_ascent(self, step: int, slots: Sequence[Slot]) -> bool:
        # algorithms.md's choice: step 1 has no subspace yet; it takes its gradient at theta.
        return step > 1 and super()._wants_ascent(step, slots)

    def _update_param(self, slot: Slot, grad: torch.Tensor) -> None:
        lay = self._step_plan.layouts[slot.index]
        if lay is None:
            super()._update_param(slot, grad)
        else:
            self._projected_update(slot, grad, lay, self._global["moment_transform"])

    # --- probes in the subspace ---------------------------------------------------------------

    def _apply_noise_(
        self,
        slots: Sequence[Slot],
        seed: int,
        alpha: float | Sequence[float],
        beta: float | Sequence[float] = 1.0,
        *,
        row_vectors: Sequence[torch.Tensor] | None = None,
        gamma: float | Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Dense slots: ``p <- beta p + alpha z`` (the base's kernel). Slots with a basis:
        ``W <- beta W + alpha Q U`` (left) or ``alpha U Q^T`` (right), ``U`` of ``R``'s shape from
        ``(seed, stream)``, by ``addmm_`` in place. Returns ``||z||^2`` or ``||U||^2`` per slot."""
        if row_vectors is not None or gamma is not None:
            raise NotImplementedError("Lorenza probes take no row vectors")
        n = len(slots)
        alphas, betas = per_slot(alpha, n, "alpha"), per_slot(beta, n, "beta")
        layouts = self._step_plan.layouts
        dense = [k for k, s in enumerate(slots) if layouts[s.index] is None]
        # A projected parameter without a basis yet (added or unfrozen after step 1) is not probed.
        projected = [k for k, s in enumerate(slots) if layouts[s.index] is not None and "proj" in self.state[s.param]]
        device = slots[0].param.device if n else torch.device("cpu")
        out = torch.zeros(n, dtype=torch.float32, device=device)
        if dense:
            sq = super()._apply_noise_(
                [slots[k] for k in dense], seed, [alphas[k] for k in dense], [betas[k] for k in dense]
            )
            out[dense] = sq.to(device)
        for k in projected:
            out[k] = self._apply_subspace_noise_(slots[k], seed, alphas[k], betas[k]).to(device)
        return out

    def _apply_subspace_noise_(self, slot: Slot, seed: int, alpha: float, beta: float) -> torch.Tensor:
        Q = self.state[slot.param]["proj"]
        param = slot.param.detach()
        m, n = matrix_dims(param)
        right = side_for(m, n) == "right"
        shape = (m, Q.shape[1]) if right else (Q.shape[1], n)
        U = lk.gaussian(shape, seed, slot.stream, device=param.device)
        norm_sq = U.square().sum()
        work = param if param.is_contiguous() else param.contiguous()
        W = work.view(m, n)
        if W.dtype != U.dtype:
            U, Q = U.to(W.dtype), Q.to(W.dtype)
        if right:
            W.addmm_(U, Q.t(), beta=beta, alpha=alpha)
        else:
            W.addmm_(Q, U, beta=beta, alpha=alpha)
        if work is not param:
            param.copy_(work)
        return norm_sq


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
