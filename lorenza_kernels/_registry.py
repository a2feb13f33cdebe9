"""Backend registry: which implementation of an op runs on which device.

Every op has a reference implementation (pure torch, any device) and optionally faster ones:
``cpu`` (the C++/OpenMP extension), ``cuda`` (the CUDA C++ extension) and ``triton``. The op
registered with ``torch.library`` (``_ops.py``) calls :func:`dispatch`, which picks, for the
device of the op's tensors, the first backend of the preference order that implements the op.

Forcing a backend (tests, benchmarks): the environment variable ``LORENZA_KERNELS_BACKEND``
(read at import) or the context manager :func:`use_backend`. A forced backend is used wherever it
implements the op on that device; elsewhere the reference runs (a forced backend never makes an
op fail that would otherwise run).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "LORENZA_KERNELS_BACKEND"

#: Preference order per device type when no backend is forced. On CUDA the order between the
#: CUDA C++ and Triton kernels is decided per op by measurement (bench/results); ops override it
#: through ``register(..., priority=...)``.
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "cpu": ("cpu", "reference"),
    "cuda": ("cuda", "triton", "reference"),
}

# op name -> backend -> device type -> implementation
_IMPLS: dict[str, dict[str, dict[str, Callable]]] = {}
# op name -> device type -> preference order overriding DEFAULT_ORDER
_ORDER_OVERRIDE: dict[str, dict[str, tuple[str, ...]]] = {}


def _parse(name: str | None, source: str) -> str | None:
    if name is None or name == "" or name == "auto":
        return None
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    return name


_forced: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "lorenza_kernels_backend", default=_parse(os.environ.get(ENV_VAR), ENV_VAR)
)


def register(op: str, backend: str, device_types: str | tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op`` on ``device_types``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}")
    devices = (device_types,) if isinstance(device_types, str) else tuple(device_types)

    def deco(fn: Callable) -> Callable:
        per_backend = _IMPLS.setdefault(op, {}).setdefault(backend, {})
        for d in devices:
            per_backend[d] = fn
        return fn

    return deco


def set_preference(op: str, device_type: str, order: tuple[str, ...]) -> None:
    """Override the default preference order of ``op`` on ``device_type`` (a measured decision)."""
    _ORDER_OVERRIDE.setdefault(op, {})[device_type] = tuple(order)


def implementation(op: str, backend: str, device_type: str) -> Callable | None:
    """``backend``'s implementation of ``op`` on ``device_type``, or None (no fallback)."""
    impls = _IMPLS.get(op, {}).get(backend, {})
    return impls.get(device_type, impls.get("any"))


def select(op: str, device_type: str) -> tuple[str, Callable]:
    """The (backend, implementation) that runs ``op`` on ``device_type`` now."""
    forced = _forced.get()
    if forced is not None:
        order: tuple[str, ...] = (forced, "reference")
    else:
        order = _ORDER_OVERRIDE.get(op, {}).get(device_type) or DEFAULT_ORDER.get(device_type, ("reference",))
        if "reference" not in order:
            order = (*order, "reference")
    for backend in order:
        fn = implementation(op, backend, device_type)
        if fn is not None:
            return backend, fn
    raise NotImplementedError(f"lorenza_kernels::{op} has no implementation for device type {device_type!r}")


def dispatch(op: str, device_type: str, *args, **kwargs):
    """Run ``op`` with the implementation :func:`select` picks."""
    return select(op, device_type)[1](*args, **kwargs)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force ``name`` (``reference``, ``cpu``, ``cuda``, ``triton``; None or ``auto`` for the default)."""
    token = _forced.set(_parse(name, "use_backend"))
    try:
        yield
    finally:
        _forced.reset(token)


def forced_backend() -> str | None:
    return _forced.get()


def available(op: str | None = None) -> dict[str, dict[str, list[str]]]:
    """``{op: {device_type: [backends in preference order]}}`` for the registered ops."""
    out: dict[str, dict[str, list[str]]] = {}
    for name in [op] if op else sorted(_IMPLS):
        per_dev: dict[str, list[str]] = {}
        devices = {d for impls in _IMPLS.get(name, {}).values() for d in impls if d != "any"} | set(DEFAULT_ORDER)
        for dev in sorted(devices):
            order = _ORDER_OVERRIDE.get(name, {}).get(dev) or DEFAULT_ORDER.get(dev, ())
            order = (*[b for b in order if b != "reference"], "reference")
            per_dev[dev] = [b for b in order if implementation(name, b, dev) is not None]
        out[name] = per_dev
    return out
