"""The backward pass of the gradient-taking optimizers, in normal or per-layer mode.

Normal mode: zero the gradients, run the closure with grad enabled, check the loss and every
gradient for non-finite values (one synchronisation), remove the recorded :class:`Perturbation`,
then update every parameter that has a gradient.

Per-layer mode (``per_layer=True``): each parameter's post-accumulate-grad hook
(``Tensor.register_post_accumulate_grad_hook``, PyTorch's "optimizer step in backward" pattern,
https://pytorch.org/tutorials/intermediate/optimizer_step_in_backward_tutorial.html) removes that
parameter's perturbation, checks its gradient, updates it and frees the gradient at once, so that
at most one layer's gradient is alive. The hooks act only inside the optimizer's own backward
pass; a backward pass elsewhere accumulates gradients as usual.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._noise import Perturbation, Slot
from .closure import as_loss

__all__ = ["BackwardPassMixin"]


class _LayerPass:
    """Bookkeeping of one per-layer backward pass."""

    def __init__(self, perturbation: Perturbation):
        self.perturbation = perturbation
        self.ok = True
        self.seen = 0
        self.done: set[int] = set()


class BackwardPassMixin:
    """Mixed into :class:`~lorenza.optim.SeededOptimizer`; uses its ``per_layer``, ``_layer_pass``,
    ``_hook_handles``, ``_skip``, ``_all_finite`` and ``zero_grad``."""

    def _update_param(self, slot: Slot, grad: torch.Tensor) -> None:
        """The update of one parameter from its gradient (after its perturbation is removed)."""
        raise NotImplementedError(f"{type(self).__name__} takes no gradient")

    def _gradient_pass(self, closure: Callable[[], Any], slots: Sequence[Slot], perturbation: Perturbation) -> torch.Tensor:
        """Zero the gradients, run the closure with grad enabled, remove ``perturbation`` and update.

        Normal mode: all-or-nothing; a non-finite loss or gradient skips the step. Per-layer mode:
        each parameter is restored, checked and updated in its hook and its gradient freed there;
        a non-finite gradient stops the updates of the parameters whose hooks run after it (those
        that ran before keep theirs: per-layer mode cannot undo them without a copy).
        """
        self.zero_grad(set_to_none=True)
        layer_pass = _LayerPass(perturbation)
        self._layer_pass = layer_pass if self.per_layer else None
        try:
            with torch.enable_grad():
                loss = as_loss(closure())
        except BaseException:
            self._layer_pass = None
            perturbation.restore()
            self.zero_grad(set_to_none=True)
            raise
        self._layer_pass = None
        if self.per_layer:
            # Parameters with a gradient but no hook (made trainable after construction).
            for slot in slots:
                if not perturbation.restored[slot.index] and slot.param.grad is not None:
                    self._finish_param(layer_pass, slot.index)
        grads = [] if self.per_layer else [s.param.grad for s in slots if s.param.grad is not None]
        if layer_pass.seen == 0 and not grads:
            perturbation.restore()
            raise RuntimeError(
                "closure: called with gradients enabled it must call loss.backward() (see lorenza.optim.make_closure)"
            )
        if self.per_layer:
            perturbation.restore()  # the parameters the backward pass did not reach
            if not layer_pass.ok:
                self._skip("non-finite gradient (per-layer mode: parameters updated before it keep their update)")
            return loss
        finite = self._all_finite([loss, *grads])
        perturbation.restore()
        if not finite:
            self._skip("non-finite loss or gradient in the backward pass")
            return loss
        for slot in slots:
            if slot.param.grad is not None:
                self._update_param(slot, slot.param.grad)
        return loss

    def _install_hooks(self, params: Sequence[torch.Tensor]) -> None:
        ref = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            opt = ref()
            if opt is not None:
                opt._on_grad_ready(param)

        for p in params:
            if isinstance(p, torch.Tensor) and p.requires_grad:
                self._hook_handles.append(p.register_post_accumulate_grad_hook(hook))

    def remove_hooks(self) -> None:
        """Remove the per-layer hooks (the optimizer then works in normal mode)."""
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []
        self.per_layer = False

    @torch.no_grad()
    def _on_grad_ready(self, param: torch.Tensor) -> None:
        layer_pass = self._layer_pass
        if layer_pass is None:  # a backward outside our step: gradients accumulate as usual
            return
        i = layer_pass.perturbation.index.get(id(param))
        if i is not None:
            self._finish_param(layer_pass, i)

    def _finish_param(self, layer_pass: _LayerPass, i: int) -> None:
        """Per-layer mode, one parameter: remove its perturbation, check, update, free its gradient."""
        pert = layer_pass.perturbation
        param = pert.slots[i].param
        if i in layer_pass.done:
            raise RuntimeError(
                "per_layer=True: a parameter received a gradient twice in one step (the closure ran several "
                "backward passes, e.g. gradient accumulation); use per_layer=False"
            )
        layer_pass.done.add(i)
        pert.restore([i])
        layer_pass.seen += 1
        grad = param.grad
        if layer_pass.ok and grad is not None and bool(torch.isfinite(grad).all()):
            self._update_param(pert.slots[i], grad)
        else:
            layer_pass.ok = False
        param.grad = None
