"""SAM (Foret et al., 2021, https://arxiv.org/abs/2010.01412): the two-backward baseline.

The calling convention is that of the widely used wrapper https://github.com/davda54/sam
(``sam.py``): ``SAM(params, base_optimizer_class, rho=..., adaptive=..., **base_kwargs)``,
``first_step(zero_grad)`` / ``second_step(zero_grad)`` after manual backward passes, or
``step(closure)``. This is an independent implementation with these differences:

* ``step(closure)`` also works with no gradient computed beforehand: when no parameter has a
  gradient it first calls the closure with grad enabled to get one (the project's closure
  protocol); when gradients are present it uses them, as davda54's ``step`` does. It frees the
  gradients at the end, so the next call starts clean whatever convention the caller follows.
* ``second_step`` restores the parameters in place (``p.copy_(old_p)``, keeping each parameter's
  storage) and frees the copies: between steps the state holds only the base optimizer's state.
* ``state_dict`` holds the base optimizer's state (davda54's holds only SAM's own), plus the skip
  counter; the gradient norm is accumulated in float32.
* Non-finite loss or gradient: the step is skipped (parameters restored exactly from the copies,
  base optimizer not called), counted in ``skipped_steps`` and warned once.

``rho = 0`` reproduces the base optimizer exactly (the perturbation is zero and the restore a copy).

FSDP2's sharded parameters (DTensors, ``docs/algorithms.md`` "Distributed training"): the ascent
and the restore run on each rank's shard; ``||g||`` is the norm of the whole gradient (the shards'
squared norms added over the ranks in one all-reduce) and the finiteness verdict is every rank's,
so all ranks perturb alike and skip the same steps. The base optimizer sees the DTensors as usual.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch

from . import _checks, _sharding
from ._backward import all_finite
from .closure import as_loss, is_finite

__all__ = ["SAM"]


class SAM(torch.optim.Optimizer):
    r"""Sharpness-aware minimisation around any ``torch.optim`` optimizer, ``docs/algorithms.md`` "SAM".

    ``e = rho g / (||g|| + 1e-12)`` (ASAM with ``adaptive=True``: ``e = rho |p|^2 g / (|| |p| g || + 1e-12)``)
    from a first forward/backward, the gradient at ``p + e`` from a second, restore, base step.
    Memory: the base optimizer's state plus one copy of the parameters during the step (the
    table's "3 x params" for SAM-AdamW).
    """

    def __init__(
        self,
        params: Any,
        base_optimizer: type[torch.optim.Optimizer],
        rho: float = 0.05,
        adaptive: bool = False,
        **base_kwargs: Any,
    ) -> None:
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
            raise TypeError(
                "base_optimizer: expected a torch.optim.Optimizer subclass (the class, not an instance), "
                f"got {base_optimizer!r}"
            )
        _checks.non_negative("rho", rho)
        _checks.boolean("adaptive", adaptive)
        self._global: dict[str, Any] = {"format": 1, "skipped": 0}
        self._warned_skip = False
        self._skip_pending = False
        defaults = dict(rho=rho, adaptive=adaptive, **base_kwargs)
        super().__init__(params, defaults)
        self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "rho" in param_group:
            _checks.non_negative("rho", param_group["rho"])
        if "adaptive" in param_group:
            _checks.boolean("adaptive", param_group["adaptive"])
        base = getattr(self, "base_optimizer", None)
        if base is None:
            super().add_param_group(param_group)
            return
        param_group.setdefault("rho", self.defaults["rho"])
        param_group.setdefault("adaptive", self.defaults["adaptive"])
        base.add_param_group(param_group)  # self.param_groups is base.param_groups

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer keeps only defaults, state and param_groups: SAM needs its base
        # optimizer (whose param_groups are SAM's) and counters to survive copy.deepcopy and pickle.
        return {**super().__getstate__(), "base_optimizer": self.base_optimizer, "_global": self._global,
                "_warned_skip": self._warned_skip, "_skip_pending": self._skip_pending}  # fmt: skip

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "base_optimizer" in state:
            self.param_groups = self.base_optimizer.param_groups

    @property
    def skipped_steps(self) -> int:
        return self._global["skipped"]

    def _params_with_grad(self):
        return [(p, g) for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _shard_group(self) -> Any:
        """The process group of FSDP2's mesh when a parameter is a sharded DTensor, else None."""
        for group in self.param_groups:
            for p in group["params"]:
                info = _sharding.shard_of(p)
                if info is not None:
                    return info.group
        return None

    def _skip(self, reason: str) -> None:
        self._global["skipped"] += 1
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                f"SAM: step skipped: {reason}. Parameters restored, base optimizer not called; later skips are "
                "counted in `skipped_steps` without a warning.",
                RuntimeWarning,
                stacklevel=3,
            )

    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        """``||g||`` (``|| |p| g ||`` for adaptive groups) over every parameter, accumulated in float32."""
        norms = []
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            if not live:
                continue
            params = [_sharding.local(p) for p in live]  # a sharded parameter's shard
            grads = [_sharding.local(p.grad) for p in live]
            if group["adaptive"]:
                grads = torch._foreach_mul(torch._foreach_abs(params), grads)
            norms += torch._foreach_norm(grads, 2, dtype=torch.float32)
        device = self._params_with_grad()[0][0].device
        group = self._shard_group()
        if group is None:
            return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))
        # a shard's norm is its part: square, add over the ranks (every rank holds its shard of
        # every parameter, and the replicated ones are not DTensors: counted on rank 0 only)
        sharded = [_sharding.is_dtensor(p) for p, _ in self._params_with_grad()]
        sq = torch.stack([n.to(device).double().square() for n in norms])
        if not all(sharded) and torch.distributed.get_rank(group) != 0:
            sq = sq * torch.tensor(sharded, dtype=sq.dtype, device=device)
        total = sq.sum().reshape(1)
        torch.distributed.all_reduce(total, group=group)
        return total.sqrt().float().reshape(())

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """``p <- p + e(p)`` from the gradients present; keeps a copy of each perturbed parameter."""
        self._check_rho()
        if not self._params_with_grad():
            raise RuntimeError("SAM.first_step: no parameter has a gradient; call loss.backward() first")
        _checks.dense_gradients(self, [p for p, _ in self._params_with_grad()])
        # ||g|| on the host: the finiteness check synchronises anyway, and a Python scale lets the
        # ascent be one fused `p += scale g` per list (no e = scale g temporaries).
        grad_norm = float(self._grad_norm())
        self._skip_pending = not math.isfinite(grad_norm)
        if self._skip_pending:
            self._skip("non-finite gradient in the first backward pass")
        else:
            for group in self.param_groups:
                live = [p for p in group["params"] if p.grad is not None]
                if not live:
                    continue
                scale = group["rho"] / (grad_norm + 1e-12)
                grads = [_sharding.local(p.grad) for p in live]
                params = [_sharding.local(p) for p in live]
                if group["adaptive"]:
                    grads = torch._foreach_mul(torch._foreach_pow(params, 2), grads)
                by_kind: dict[tuple, list[int]] = {}
                for k, p in enumerate(params):
                    by_kind.setdefault((p.device, p.dtype), []).append(k)
                for (device, dtype), idx in by_kind.items():
                    # the copies to restore from: one buffer per device and dtype, one copy call
                    sizes = [params[k].numel() for k in idx]
                    flat = torch.empty(sum(sizes), dtype=dtype, device=device)
                    olds = [v.view(params[k].shape) for v, k in zip(flat.split(sizes), idx)]
                    torch._foreach_copy_(olds, [params[k] for k in idx])
                    for k, old in zip(idx, olds):
                        self.state[live[k]]["old_p"] = old
                    torch._foreach_add_([params[k] for k in idx], [grads[k] for k in idx], alpha=scale)
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def _restore(self) -> None:
        params, olds = [], []
        for group in self.param_groups:
            for p in group["params"]:
                old = self.state.get(p, {}).pop("old_p", None)
                if old is not None:
                    params.append(_sharding.local(p))
                    olds.append(_sharding.local(old))
        if params:
            torch._foreach_copy_(params, olds)

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``p`` and step the base optimizer with the gradients taken at ``p + e``."""
        self._restore()
        if self._skip_pending:
            self._skip_pending = False
        elif not all_finite([p.grad for p, _ in self._params_with_grad()], self._shard_group()):
            self._skip("non-finite gradient in the second backward pass")
        else:
            self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor | None:
        """Both passes: ``closure`` (called with grad enabled) returns the loss and calls backward."""
        if closure is None:
            raise TypeError("closure: SAM.step needs a closure that computes the loss and calls backward()")
        self._check_rho()
        loss = None
        if not self._params_with_grad():
            with torch.enable_grad():
                loss = as_loss(closure())
            if not self._params_with_grad():
                raise RuntimeError("closure: called with gradients enabled it must call loss.backward()")
            if not is_finite(loss):
                self._skip("non-finite loss in the first pass")
                self.zero_grad()
                return loss
        self.first_step(zero_grad=True)
        if self._skip_pending:
            self._skip_pending = False
            self.zero_grad()
            return loss
        try:
            with torch.enable_grad():
                loss = as_loss(closure())
        except BaseException:
            self._restore()
            self.zero_grad()
            raise
        if not is_finite(loss):
            self._skip_pending = True
            self._skip("non-finite loss in the second pass")
        self.second_step(zero_grad=True)
        return loss

    def _check_rho(self) -> None:
        for group in self.param_groups:
            _checks.non_negative("rho", group["rho"])

    def state_dict(self) -> dict[str, Any]:
        sd = self.base_optimizer.state_dict()
        sd["lorenza"] = dict(self._global)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        glob = sd.pop("lorenza", None)
        if not isinstance(glob, dict):
            raise ValueError("state_dict: no 'lorenza' entry; was it saved by lorenza.optim.SAM?")
        self.base_optimizer.load_state_dict(sd)
        self.param_groups = self.base_optimizer.param_groups
        self.state.clear()
        self._global = dict(glob)
