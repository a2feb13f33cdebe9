"""The closure protocol in a plain PyTorch loop: one helper every trainer here uses.

``docs/algorithms.md``, "The closure protocol": ``optimizer.step(closure)`` where the closure evaluates
the loss of the current minibatch and returns it, and calls ``backward`` when gradients are
enabled. The optimizer calls it under ``torch.no_grad()`` for zeroth-order probes and with
gradients enabled for its one backward pass; every call of one step must see the same minibatch.

A plain loop is then::

    from lorenza.integrations import closure_step

    for batch in loader:
        loss = closure_step(optimizer, lambda: loss_fn(model, batch))

:func:`closure_step` zeroes the gradients first (``torch.optim.AdamW.step(closure)`` does not),
works with any ``torch.optim.Optimizer`` (first-order ones call the closure once), and can count
the forward/backward passes, clip gradients inside the closure (so that SAM-like optimizers get
clipped gradients where a plain loop would clip them) and give every call of one step the same
random numbers (dropout masks), without which zeroth-order differences measure dropout noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass
class PassCounter:
    """Forward passes (every closure call) and backward passes (calls with gradients enabled)."""

    forward: int = 0
    backward: int = 0


class StepClosure:
    """A closure for ``optimizer.step``; see the module docstring.

    ``loss_fn()`` returns the scalar loss of the current minibatch. ``backward`` replaces
    ``loss.backward()`` (e.g. ``accelerator.backward``). ``clip_grad_norm``/``clip_params``: clip
    the gradients of those parameters to that norm after each backward pass. ``same_randomness``:
    every call runs with the global RNGs seeded from one seed drawn (from the global RNG) when the
    closure is made, and leaves the global RNG state as it found it.
    """

    def __init__(
        self,
        loss_fn: Callable[[], torch.Tensor],
        *,
        counter: PassCounter | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
        clip_grad_norm: float | None = None,
        clip_params: Iterable[torch.Tensor] | None = None,
        same_randomness: bool = False,
    ):
        self.loss_fn = loss_fn
        self.counter = counter if counter is not None else PassCounter()
        self.backward = backward
        self.clip_grad_norm = clip_grad_norm
        self.clip_params = list(clip_params) if clip_params is not None else None
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if same_randomness else None
        self.last_loss: torch.Tensor | None = None

    def __call__(self) -> torch.Tensor:
        if self.seed is None:
            loss = self._call()
        else:
            cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(self.seed)
                loss = self._call()
        self.last_loss = loss
        return loss

    def _call(self) -> torch.Tensor:
        loss = self.loss_fn()
        self.counter.forward += 1
        if torch.is_grad_enabled():
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise RuntimeError("closure: gradients are enabled but the loss does not require grad")
            (self.backward or torch.Tensor.backward)(loss)
            self.counter.backward += 1
            if self.clip_grad_norm and self.clip_params:
                torch.nn.utils.clip_grad_norm_(self.clip_params, self.clip_grad_norm)
        return loss.detach()


def closure_step(
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[], torch.Tensor],
    *,
    counter: PassCounter | None = None,
    zero_grad: bool = True,
    **closure_kwargs,
) -> torch.Tensor:
    """One optimizer step on the minibatch ``loss_fn`` evaluates; returns the step's loss (detached).

    The loss returned is what ``optimizer.step`` returns when it is a tensor or a number (most
    optimizers return the closure's value at the unperturbed parameters), else the last value the
    closure computed.
    """
    if zero_grad:
        optimizer.zero_grad(set_to_none=True)
    closure = StepClosure(loss_fn, counter=counter, **closure_kwargs)
    out = optimizer.step(closure)
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, (int, float)):
        return torch.tensor(float(out))
    if closure.last_loss is None:
        raise RuntimeError(f"{type(optimizer).__name__}.step(closure) never called the closure")
    return closure.last_loss
