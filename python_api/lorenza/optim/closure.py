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

    # a Hugging Face model returns a ModelOutput whose .loss is the loss: that works as it is
    opt.step(lorenza.optim.make_closure(lambda: model(input_ids=batch, labels=batch)))

If anything inside a step raises (the closure, a non-scalar or non-loss return value), the step
stops and the exception propagates: the parameters and the optimizer's per-parameter state are
left bitwise as they were (with the default exact probes; ``docs/algorithms.md``, "Exceptions").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["PassCounter", "StepClosure", "as_loss", "loss_of", "make_closure"]


@dataclass
class PassCounter:
    """Forward passes (every closure call) and backward passes (calls with gradients enabled)."""

    forward: int = 0
    backward: int = 0


class StepClosure:
    """The one closure implementation of the package: ``optimizer.step(StepClosure(loss_fn))``.

    ``loss_fn()`` returns the scalar loss of the current minibatch, or anything that holds it: a
    Hugging Face ``ModelOutput`` (``model(input_ids=..., labels=...)``), a tuple starting with it
    (:func:`loss_of`). When gradients are enabled (the
    optimizer's backward pass) the closure calls ``backward`` on it (``loss.backward()`` unless
    ``backward`` is given, e.g. ``accelerator.backward``); under ``torch.no_grad()`` (zeroth-order
    probes) no graph is built and no backward runs. It returns the loss detached.

    Options: ``counter`` counts forward and backward passes; ``clip_grad_norm``/``clip_params``
    clip those parameters' gradients to that norm after each backward pass (so that SAM-like
    optimizers get clipped gradients where a plain loop would clip them), and ``grad_norm`` keeps
    the norm before clipping (also without clipping when ``track_grad_norm``); ``same_randomness``
    runs every call with the global RNGs seeded from one seed drawn (from the global RNG) when the
    closure is made, and leaves the global RNG state as it found it (dropout masks then agree
    between the probes of one step).

    Raises ``RuntimeError`` when gradients are enabled but the loss does not require grad (every
    parameter frozen, or ``loss_fn`` itself disabling grad), rather than letting the optimizer step
    on missing gradients.
    """

    def __init__(
        self,
        loss_fn: Callable[[], Any],
        *,
        counter: PassCounter | None = None,
        backward: Callable[[torch.Tensor], None] | None = None,
        clip_grad_norm: float | None = None,
        clip_params: Iterable[torch.Tensor] | None = None,
        same_randomness: bool = False,
        track_grad_norm: bool = False,
    ):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn
        self.counter = counter if counter is not None else PassCounter()
        self.backward = backward
        self.clip_grad_norm = clip_grad_norm
        self.clip_params = list(clip_params) if clip_params is not None else None
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if same_randomness else None
        self.last_loss: Any = None
        self.track_grad_norm = track_grad_norm
        #: the total norm of ``clip_params``' gradients after the last backward pass, before clipping
        #: (set when clipping or ``track_grad_norm``; None when no backward pass ran).
        self.grad_norm: torch.Tensor | None = None

    def __call__(self) -> Any:
        if self.seed is None:
            loss = self._call()
        else:
            cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
            with torch.random.fork_rng(devices=cuda):
                torch.manual_seed(self.seed)
                loss = self._call()
        self.last_loss = loss
        return loss

    def _call(self) -> Any:
        loss = loss_of(self.loss_fn(), "loss_fn")
        self.counter.forward += 1
        if torch.is_grad_enabled():
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise RuntimeError(
                    "closure: gradients are enabled but the loss does not require grad "
                    "(are all parameters frozen, or does loss_fn run under torch.no_grad()?)"
                )
            (self.backward or torch.Tensor.backward)(loss)
            self.counter.backward += 1
            if self.clip_params and (self.clip_grad_norm or self.track_grad_norm):
                grads = [p.grad for p in self.clip_params if p.grad is not None]
                if not grads:  # per-layer mode freed them in the backward pass
                    self.grad_norm = None
                elif self.clip_grad_norm:
                    self.grad_norm = torch.nn.utils.clip_grad_norm_(self.clip_params, self.clip_grad_norm).detach()
                else:
                    self.grad_norm = torch.nn.utils.get_total_norm(grads).detach()
        return loss.detach() if isinstance(loss, torch.Tensor) else loss


def make_closure(loss_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> StepClosure:
    """A closure for ``optimizer.step`` from a function that computes the loss:
    ``StepClosure(lambda: loss_fn(*args, **kwargs))`` (see :class:`StepClosure`)."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
    return StepClosure(functools.partial(loss_fn, *args, **kwargs) if args or kwargs else loss_fn)


def loss_of(value: Any, name: str = "closure") -> Any:
    """The loss inside what a loss function returns: a Hugging Face ``ModelOutput`` (or any object
    with a tensor ``.loss``, or a mapping with a ``"loss"`` entry), a tuple or list whose first
    element is the loss, or the loss itself (a scalar tensor or a number), returned as it is."""
    if isinstance(value, (torch.Tensor, int, float)):
        return value
    loss = getattr(value, "loss", None)
    if loss is None and isinstance(value, dict):
        loss = value.get("loss")
    if loss is None and isinstance(value, (tuple, list)) and value:
        loss = value[0]
    if loss is None:
        raise TypeError(
            f"{name}: must return the loss: a scalar tensor, a float, an object with a .loss tensor "
            f"(a Hugging Face ModelOutput: pass labels to the model), or a tuple starting with the loss; "
            f"got {type(value).__name__}"
        )
    return loss


def as_loss(value: Any, name: str = "closure") -> torch.Tensor:
    """The closure's return value (see :func:`loss_of`) as a detached 0-d tensor; a clear error when
    it is not a real scalar."""
    value = loss_of(value, name)
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
    raise TypeError(f"{name}: the loss must be a scalar tensor or a float, got {type(value).__name__}")


def is_finite(x: torch.Tensor | float) -> bool:
    """Host-side finiteness of a scalar (one device synchronisation for a tensor)."""
    return math.isfinite(float(x))
