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
