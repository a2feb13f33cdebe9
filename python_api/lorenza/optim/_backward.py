"""The one backward pass of the gradient-taking optimizers, in normal or per-layer mode.

A component (:class:`GradientPass`) that an optimizer holds; it calls back the optimizer's
``_update(ctx, slots, grads)`` hook and nothing else of it (plus ``zero_grad`` and ``_skip``).

Normal mode: zero the gradients, run the closure with grad enabled, check the loss and every
gradient for non-finite values (one synchronisation), remove the step's :class:`Perturbation`,
then update every parameter that has a gradient in ONE call of the hook.

Per-layer mode (``per_layer=True``): each parameter's post-accumulate-grad hook
(``Tensor.register_post_accumulate_grad_hook``, PyTorch's "optimizer step in backward" pattern,
https://pytorch.org/tutorials/intermediate/optimizer_step_in_backward_tutorial.html) removes that
parameter's perturbation, checks its gradient, updates it and frees the gradient at once, so that
at most one layer's gradient is alive. The hooks act only inside a pass the optimizer has opened;
a backward pass elsewhere accumulates gradients as usual.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from . import _checks, _sharding
from ._noise import Perturbation
from .closure import as_loss

__all__ = ["GradientPass", "LayerPass", "all_finite"]

_NO_BACKWARD = "closure: called with gradients enabled it must call loss.backward() (see lorenza.optim.make_closure)"


def all_finite(tensors: Sequence[torch.Tensor], group: object = None) -> bool:
    """Every element of every tensor finite: one multi-tensor check and one host synchronisation
    per device. The check is the one ``torch.amp.GradScaler`` runs on every step (it multiplies by
    an inverse scale, here exactly 1, which changes no value). With ``group`` (the tensors are shards
    of sharded gradients) the verdict is every rank's: one more all-reduce of one number, so that
    all ranks skip the same steps."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        t = _sharding.local(t)
        by_device.setdefault(t.device, []).append(t if t.is_floating_point() else t.float())
    flags = []
    for device, ts in by_device.items():
        found = torch.zeros(1, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(ts, found, torch.ones(1, dtype=torch.float32, device=device))
        flags.append(found)
    if group is not None:
        total = torch.zeros(1, dtype=torch.float32, device=flags[0].device if flags else "cpu")
        for f in flags:
            total += f.to(total.device)
        dist.all_reduce(total, op=dist.ReduceOp.MAX, group=group)
        return not bool(total.item())
    return not any(bool(f.item()) for f in flags)


def shard_group(slots: Sequence[Any]) -> object | None:
    """The process group of the slots' shards (FSDP2's mesh), None when no slot is sharded."""
    for s in slots:
        if s.shard is not None:
            return s.shard.group
    return None


class LayerPass:
    """Bookkeeping of one per-layer backward pass: its step's context and perturbation (if any)."""

    def __init__(self, ctx: Any, perturbation: Perturbation | None = None):
        self.ctx = ctx
        self.perturbation = perturbation
        self.index = {id(s.param): s.index for s in ctx.slots}
        self.ok = True
        self.seen = 0
        self.done: set[int] = set()


class GradientPass:
    """Runs the backward pass of ``optimizer`` and hands the gradients to its ``_update`` hook."""

    def __init__(self, optimizer: Any):
        self._owner = weakref.ref(optimizer)
        self.handles: list[Any] = []
        self.active: LayerPass | None = None

    @property
    def owner(self) -> Any:
        return self._owner()

    # --- hooks ----------------------------------------------------------------------------------

    def install(self, params: Sequence[torch.Tensor]) -> None:
        ref = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            gp = ref()
            if gp is not None:
                gp.on_grad_ready(param)

        for p in params:
            if isinstance(p, torch.Tensor) and p.requires_grad:
                self.handles.append(p.register_post_accumulate_grad_hook(hook))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # --- a closure-driven step --------------------------------------------------------------------

    def run(self, ctx: Any, closure: Callable[[], Any], perturbation: Perturbation) -> torch.Tensor:
        """Zero the gradients, run the closure with grad enabled, remove ``perturbation``, update.

        Normal mode: all-or-nothing; a non-finite loss or gradient skips the step. Per-layer mode:
        each parameter is restored, checked and updated in its hook and its gradient freed there;
        a non-finite gradient stops the updates of the parameters whose hooks run after it (those
        that ran before keep theirs: per-layer mode cannot undo them without a copy).
        """
        opt = self.owner
        _checks.per_layer_alone(opt)
        opt.zero_grad(set_to_none=True)
        layer_pass = LayerPass(ctx, perturbation)
        self.active = layer_pass if opt.per_layer else None
        _sharding.resync([s.param for s in ctx.slots if s.shard is not None])  # in-place ascent: gather it
        try:
            with torch.enable_grad(), perturbation.applied(differentiable=True):
                loss = as_loss(closure())
        except BaseException:
            self.active = None
            perturbation.restore()
            opt.zero_grad(set_to_none=True)
            raise
        self.active = None
        if opt.per_layer:
            self.finish_leftovers(layer_pass)
            if layer_pass.seen == 0 and ctx.slots:
                perturbation.restore()
                raise RuntimeError(_NO_BACKWARD)
            perturbation.restore()  # the parameters the backward pass did not reach
            if not layer_pass.ok:
                opt._skip("non-finite gradient (per-layer mode: parameters updated before it keep their update)")
            return loss
        if ctx.slots and not any(s.param.grad is not None for s in ctx.slots):
            perturbation.restore()
            raise RuntimeError(_NO_BACKWARD)
        self.update_present(ctx, perturbation, extra=[loss])
        return loss

    def update_present(self, ctx: Any, perturbation: Perturbation | None, extra: Sequence[torch.Tensor] = ()) -> bool:
        """Normal mode, after the backward pass: check, remove the perturbation, one update call."""
        opt = self.owner
        if perturbation is not None:
            perturbation.restore()  # first: the checks below may raise
        live = [s for s in ctx.slots if s.param.grad is not None]
        _checks.dense_gradients(opt, [s.param for s in live])
        grads = [s.grad for s in live]  # a sharded gradient's local shard
        finite = all_finite([*extra, *grads], shard_group(ctx.slots))
        if not finite:
            opt._skip("non-finite loss or gradient in the backward pass" if extra else "non-finite gradient")
            return False
        if live:
            opt._update(ctx, live, grads)
            _sharding.resync([s.param for s in live if s.shard is not None])
        return True

    # --- per-layer mode ---------------------------------------------------------------------------

    def open(self, ctx: Any) -> LayerPass:
        """Open a per-layer pass driven by the user's own backward pass (GaLore-AdamW): no probe,
        nothing to restore; :meth:`close` ends it."""
        _checks.per_layer_alone(self.owner)
        self.active = LayerPass(ctx)
        return self.active

    def close(self) -> LayerPass | None:
        """End the open pass after its leftover parameters; returns it (None if none was open)."""
        layer_pass, self.active = self.active, None
        if layer_pass is not None:
            self.finish_leftovers(layer_pass)
        return layer_pass

    def finish_leftovers(self, layer_pass: LayerPass) -> None:
        """Parameters with a gradient but no hook (made trainable after construction)."""
        for slot in layer_pass.ctx.slots:
            if slot.index not in layer_pass.done and slot.param.grad is not None:
                self._finish(layer_pass, slot.index)

    @torch.no_grad()
    def on_grad_ready(self, param: torch.Tensor) -> None:
        opt = self.owner
        if opt is None:
            return
        layer_pass = self.active
        if layer_pass is None:
            layer_pass = opt._open_layer_pass()  # None: a backward outside any step of ours
            if layer_pass is None:
                return
        i = layer_pass.index.get(id(param))
        if i is not None:
            self._finish(layer_pass, i)

    def _finish(self, layer_pass: LayerPass, i: int) -> None:
        """One parameter: remove its perturbation, check, update, free its gradient."""
        slot = layer_pass.ctx.slots[i]
        if i in layer_pass.done:
            raise RuntimeError(
                "per_layer=True: a parameter received a gradient twice in one step (the closure ran several "
                "backward passes, e.g. gradient accumulation); use per_layer=False"
            )
        layer_pass.done.add(i)
        if layer_pass.perturbation is not None:
            layer_pass.perturbation.restore([i])
        layer_pass.seen += 1
        grad = slot.param.grad
        _checks.dense_gradients(self.owner, [slot.param])
        if layer_pass.ok and grad is not None and bool(torch.isfinite(grad).all()):
            self.owner._update(layer_pass.ctx, [slot], [grad])
        else:
            layer_pass.ok = False
        slot.param.grad = None
