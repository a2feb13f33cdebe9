"""Hyperparameter checks: every error names the argument at fault; nothing is modified before them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from lorenza_kernels._checks import seed_value

Check = Callable[[str, Any], None]


def _number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}: must be finite, got {value}")
    return value


def non_negative(name: str, value: Any) -> None:
    if _number(name, value) < 0:
        raise ValueError(f"{name}: must be >= 0, got {value}")


def positive(name: str, value: Any) -> None:
    if _number(name, value) <= 0:
        raise ValueError(f"{name}: must be > 0, got {value}")


def unit_interval(name: str, value: Any) -> None:
    """In [0, 1): momentum and Adam betas."""
    v = _number(name, value)
    if not 0.0 <= v < 1.0:
        raise ValueError(f"{name}: must lie in [0, 1), got {value}")


def betas(name: str, value: Any) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name}: expected a pair (beta1, beta2), got {value!r}")
    unit_interval(f"{name}[0]", value[0])
    unit_interval(f"{name}[1]", value[1])


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")


def int_at_least(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {low}, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name}: must be >= {low}, got {value}")
    return value


def dtype_or_none(name: str, value: Any, allowed: tuple[torch.dtype, ...]) -> None:
    if value is not None and value not in allowed:
        raise TypeError(f"{name}: expected None or one of {allowed}, got {value!r}")


def seed(name: str, value: Any) -> int:
    """An integral seed in [0, 2^64) (the rule of ``lorenza_kernels``, defined once there)."""
    return seed_value(value, name)


def choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def param_label(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> str:
    """``param_groups[g]['params'][k]`` with its name when the group has ``param_names``, and shape."""
    for g, group in enumerate(optimizer.param_groups):
        for k, p in enumerate(group["params"]):
            if p is param:
                names = group.get("param_names")
                name = f" ({names[k]!r})" if isinstance(names, (list, tuple)) and k < len(names) else ""
                return f"param_groups[{g}]['params'][{k}]{name} of shape {tuple(param.shape)}"
    return f"a parameter of shape {tuple(param.shape)}"


def dense_gradients(optimizer: torch.optim.Optimizer, params: Any) -> None:
    """Raise, naming the parameter, when a gradient is sparse (``nn.Embedding(sparse=True)``): the
    kernels and the finiteness check take strided tensors. Called before anything is modified."""
    for p in params:
        g = p.grad
        if g is not None and g.layout != torch.strided:
            raise TypeError(
                f"{param_label(optimizer, p)}: gradient layout {g.layout} is not supported by "
                f"{type(optimizer).__name__}, which needs dense gradients; build the module with sparse=False "
                "(e.g. nn.Embedding(..., sparse=False))"
            )


def not_sharded(optimizer_name: str, k: int, param: Any) -> None:
    """DTensor parameters: FSDP2's (``fully_shard``: ``Shard(0)`` on a 1-D mesh) are supported, each
    rank working on its shard with the global element indices (``_sharding.py``); any other placement
    (tensor parallelism, HSDP, ``shard_placement_fn``) is refused at construction, naming it."""
    from . import _sharding

    _sharding.check_param(f"params[{k}]", optimizer_name, param)


def per_layer_alone(optimizer: Any) -> None:
    """``per_layer=True`` updates each parameter in its gradient hook, before data parallelism
    (DistributedDataParallel, or any averaging after the backward pass) could average the
    gradients: with more than one rank the ranks would diverge, so the combination is refused."""
    if not optimizer.per_layer:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(optimizer.process_group)
        if world > 1:
            raise ValueError(
                f"per_layer: True is not compatible with data parallelism (world size {world}): each parameter "
                "is updated in its gradient hook, before DistributedDataParallel averages the gradients (or "
                "FSDP2's fully_shard reduce-scatters them), so the ranks would diverge; use per_layer=False"
            )
