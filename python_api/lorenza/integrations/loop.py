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
works with any ``torch.optim.Optimizer`` (first-order ones call the closure once), and builds the
closure with :class:`lorenza.optim.closure.StepClosure`, the package's one closure (which can count
the forward/backward passes, clip gradients inside the closure and give every call of one step the
same random numbers, without which zeroth-order differences measure dropout noise).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..optim.closure import PassCounter, StepClosure

__all__ = ["PassCounter", "StepClosure", "closure_step"]


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
