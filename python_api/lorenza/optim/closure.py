"""The closure protocol of ``docs/algorithms.md`` and a helper that builds correct closures.

``optimizer.step(closure)``: the closure evaluates the loss of the current minibatch and returns
it (a scalar); when gradients are enabled it also calls ``backward``. The optimizers call it under
``torch.no_grad()`` for every zeroth-order probe and, with gradients enabled and the gradients
zeroed beforehand, for the one backward pass of the methods that need one. Every probe of one
step sees the same minibatch, so the closure must not advance a data iterator itself.

Example::

    def loss_fn():
        return torch.nn.functional.cross_entropy(model(x), y)

    opt.step(lorenza.optim.make_closure(loss_fn))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["as_loss", "make_closure"]


def make_closure(loss_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], torch.Tensor]:
    """A closure for ``optimizer.step`` from a function that computes the loss.

    The closure calls ``loss_fn(*args, **kwargs)``; when gradients are enabled (the optimizer's
    backward pass) it calls ``loss.backward()`` on the result; it returns the loss detached.
    Under ``torch.no_grad()`` (zeroth-order probes) no graph is built and no backward is run.

    ``loss_fn`` must return a scalar tensor. Raises ``RuntimeError`` when gradients are enabled but
    the loss does not require grad (every parameter frozen, or ``loss_fn`` itself disabling grad),
    rather than letting the optimizer step on missing gradients.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")

    def closure() -> torch.Tensor:
        loss = loss_fn(*args, **kwargs)
        if torch.is_grad_enabled():
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise RuntimeError(
                    "make_closure: gradients are enabled but the loss does not require grad "
                    "(are all parameters frozen, or does loss_fn run under torch.no_grad()?)"
                )
            loss.backward()
        return loss.detach() if isinstance(loss, torch.Tensor) else loss

    return closure


def as_loss(value: Any, name: str = "closure") -> torch.Tensor:
    """The closure's return value as a detached 0-d tensor; a clear error when it is not a scalar."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"{name}: must return a scalar loss (one element), got a tensor of shape {tuple(value.shape)}; "
                "reduce it (e.g. .mean()) inside the closure"
            )
        if value.is_complex() or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name}: must return a real scalar loss, got dtype {value.dtype}")
        return value.detach().reshape(())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"{name}: must return the loss (a scalar tensor or a float), got {type(value).__name__}")


def is_finite(x: torch.Tensor | float) -> bool:
    """Host-side finiteness of a scalar (one device synchronisation for a tensor)."""
    return math.isfinite(float(x))
