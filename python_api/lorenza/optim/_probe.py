"""Probes that never write the parameters: the perturbed value is used where a parameter is read.

Adding ``mu z`` to a bfloat16 weight and subtracting it again rounds twice, and over thousands of
steps the weights random-walk away (``docs/algorithms.md``, "Exact probes"). Here a probe is a
``TorchFunctionMode`` (:class:`ProbeMode`): inside it, every torch function that receives one of
the optimizer's parameters receives instead a fresh tensor holding the perturbed value, made by the
step's noise component from the same ``(seed, stream)`` as the in-place probe (so the same seed gives
the same probe, to the rounding of the one addition), and freed when the function returns. The
parameters are bitwise untouched by any number of probes, in every dtype.

- Memory: one perturbed copy of a parameter per function call that reads it, freed on return (a
  tied or re-used parameter is perturbed again, identically, at each read).
- A zeroth-order probe runs under ``torch.no_grad()``.
- The ascent of AdaZo-SAM and LORENZA (``theta + eps``, then one backward pass) runs with gradients:
  the perturbed copy is the output of :class:`_Perturbed`, an identity for autograd (the gradient
  reaches the parameter itself), and ``saved_tensors_hooks`` replace every perturbed copy that an
  op saves for its backward by a recipe that regenerates it, bitwise, when the backward needs it.
  So the extra memory is one layer's perturbed copy at a time, in forward and in backward, and the
  parameters come back bitwise (they were never written).
- On CUDA with Triton, ``F.linear`` on a weight with a single dense noise term goes to
  ``lorenza_kernels.seeded_linear`` when it exists: the noise is generated inside the GEMM.

What the mode cannot see (then use ``probe="inplace"``): code that reads a parameter's memory
without a torch function (a C++/CUDA extension handed ``param.data_ptr()``, or a custom kernel
that captured the tensor before the probe). A parameter that no function read during a probe is
reported by :attr:`ProbeMode.unseen` (it is then either unused by the loss or read in such a way).
Reading ``.data_ptr()`` of a parameter inside a probe is an error that says so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["Materializer", "ProbeMode", "exact_probe_context"]

#: Functions that only read metadata: no perturbed copy is needed.
_METADATA = {
    torch.Tensor.dim,
    torch.Tensor.size,
    torch.Tensor.numel,
    torch.Tensor.stride,
    torch.Tensor.is_contiguous,
    torch.Tensor.element_size,
    torch.Tensor.shape.__get__,
    torch.Tensor.dtype.__get__,
    torch.Tensor.device.__get__,
    torch.Tensor.requires_grad.__get__,
    torch.Tensor.is_cuda.__get__,
    torch.Tensor.ndim.__get__,
    # the parameter's own autograd state, not its value: a closure that clips or reads gradients
    # inside the ascent (clip_grad_norm_ after backward) must see the parameter's .grad, not a copy's
    torch.Tensor.grad.__get__,
    torch.Tensor.grad.__set__,
    torch.Tensor.grad.__delete__,
    torch.Tensor._grad.__get__,
    torch.Tensor._grad.__set__,
    torch.Tensor.is_leaf.__get__,
    torch.Tensor.grad_fn.__get__,
    torch.Tensor.requires_grad_,
    torch.Tensor.register_hook,
    torch.Tensor.register_post_accumulate_grad_hook,
}
_RAW = {torch.Tensor.data_ptr, torch.Tensor.untyped_storage}

#: A materializer makes the perturbed copy of a parameter: ``make(param) -> new tensor`` (it keys on
#: the parameter object itself and never writes it).
Materializer = Callable[[torch.Tensor], torch.Tensor]


class _Perturbed(torch.autograd.Function):
    """``param -> perturbed copy``: an identity for autograd (the noise is a constant)."""

    @staticmethod
    def forward(ctx, param: torch.Tensor, make: Materializer) -> torch.Tensor:  # type: ignore[override]
        with torch.no_grad():
            return make(param)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


class _Regenerate:
    """What a saved perturbed copy is packed into: the recipe that rebuilds it (and the view)."""

    __slots__ = ("make", "param", "view")

    def __init__(self, make: Materializer, param: torch.Tensor, view: tuple | None):
        self.make, self.param, self.view = make, param, view

    def unpack(self) -> torch.Tensor:
        with torch.no_grad():
            out = self.make(self.param)
        if self.view is not None:
            size, stride, offset = self.view
            out = out.as_strided(size, stride, offset)
        return out


def _pack(t: torch.Tensor) -> Any:
    recipe = getattr(t, "_lorenza_recipe", None)
    if recipe is not None:
        return _Regenerate(*recipe, None)
    base = t._base
    if base is not None:
        recipe = getattr(base, "_lorenza_recipe", None)
        if recipe is not None:
            return _Regenerate(*recipe, (t.size(), t.stride(), t.storage_offset()))
    return t


def _unpack(x: Any) -> torch.Tensor:
    return x.unpack() if isinstance(x, _Regenerate) else x


class ProbeMode(TorchFunctionMode):
    """Inside this mode, functions that read a tracked parameter get ``make(param)`` instead.

    ``params``: the tracked parameters; ``make``: builds the perturbed copy of one of them;
    ``linear``: optional fused ``F.linear`` for a tracked weight (``linear(x, weight, bias)`` or None
    to decline). With ``differentiable=True`` the copies carry the gradient to the parameters and are
    regenerated in the backward pass instead of being kept (see the module docstring).
    ``resolver``: an object with ``pending`` and ``resolve() -> new tensors to track``, asked at each
    call while it has pending entries (FSDP2 creates a parameter's all-gathered tensor at its first
    all-gather, inside the forward: ``_noise.ProbeTargets``).
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        make: Materializer,
        *,
        differentiable: bool = False,
        linear: Callable[..., torch.Tensor | None] | None = None,
        resolver: Any = None,
    ):
        super().__init__()
        self.tracked = {id(p): p for p in params}
        self.resolver = resolver
        self.make = make
        self.differentiable = differentiable
        self.linear = linear
        self.seen: set[int] = set()

    @property
    def unseen(self) -> list[torch.Tensor]:
        """The tracked parameters that no torch function read inside the mode."""
        return [p for i, p in self.tracked.items() if i not in self.seen]

    def _perturbed(self, p: torch.Tensor) -> torch.Tensor:
        self.seen.add(id(p))
        if not self.differentiable or not p.requires_grad:
            return self.make(p)
        out = _Perturbed.apply(p, self.make)
        out._lorenza_recipe = (self.make, p)  # read by the saved-tensor hooks
        return out

    def _swap(self, value: Any, cache: dict[int, torch.Tensor]) -> Any:
        if isinstance(value, torch.Tensor):
            i = id(value)
            if i in self.tracked:
                if i not in cache:
                    cache[i] = self._perturbed(value)
                return cache[i]
            return value
        if isinstance(value, (list, tuple)) and any(id(v) in self.tracked for v in value):
            return type(value)(self._swap(v, cache) for v in value)
        return value

    def _reads_tracked(self, values) -> bool:
        tracked = self.tracked
        for a in values:
            if id(a) in tracked:
                return True
            if type(a) in (list, tuple):
                for v in a:
                    if id(v) in tracked:
                        return True
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # Runs for every torch function of the forward pass: the common case (no parameter among
        # the arguments) returns after one scan.
        kwargs = kwargs or {}
        if self.resolver is not None:
            for t in self.resolver.resolve():
                self.tracked[id(t)] = t
            if not self.resolver.pending:
                self.resolver = None
        if func in _METADATA or not (self._reads_tracked(args) or (kwargs and self._reads_tracked(kwargs.values()))):
            return func(*args, **kwargs)
        if func in _RAW:
            raise RuntimeError(
                "probe='exact': a parameter's memory is read directly (data_ptr / untyped_storage) during a "
                "zeroth-order probe; the probe cannot perturb such a read. Use probe='inplace' for this model."
            )
        if func is F.linear and self.linear is not None and not self.differentiable and not kwargs:
            out = self._fused_linear(args)
            if out is not None:
                return out
        cache: dict[int, torch.Tensor] = {}
        new_args = tuple(self._swap(a, cache) for a in args)
        new_kwargs = {k: self._swap(v, cache) for k, v in kwargs.items()}
        return func(*new_args, **new_kwargs)

    def _fused_linear(self, args: tuple) -> torch.Tensor | None:
        """``F.linear(x, W, b)`` with a tracked ``W`` (and ``b``) through the fused kernel, if it takes it."""
        if len(args) not in (2, 3):
            return None
        x, weight = args[0], args[1]
        bias = args[2] if len(args) == 3 else None
        tracked = self.tracked
        if id(weight) not in tracked or id(x) in tracked or (bias is not None and id(bias) not in tracked):
            return None
        out = self.linear(x, weight, bias)
        if out is not None:
            self.seen.add(id(weight))
            if bias is not None:
                self.seen.add(id(bias))
        return out


def exact_probe_context(mode: ProbeMode):
    """The mode, plus (when differentiable) the saved-tensor hooks that regenerate its copies."""
    if not mode.differentiable:
        return mode
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.autograd.graph.saved_tensors_hooks(_pack, _unpack))
    stack.enter_context(mode)
    return stack
