"""Which backend's kernel torch's dispatcher runs, per op and device type.

Backends declare their implementations with :func:`register` when their module is imported (a
table, nothing more). :func:`install` then hands them to torch's dispatcher, once: the pure-PyTorch
reference becomes every op's ``CompositeExplicitAutograd`` kernel (the default of every device), and
the first backend of :data:`DEFAULT_ORDER` that implements an op on a device type is registered for
that device's dispatch key (``CPU``, ``CUDA``). A call is then one trip through torch's dispatcher
straight to the kernel: no Python registry is consulted per call.

Forcing a backend (tests, benchmarks): the environment variable ``LORENZA_KERNELS_BACKEND`` (read at
import) or the context manager :func:`use_backend` re-register the kernels of the chosen backend;
where it does not implement an op on a device type, the reference runs there. The choice is
process-wide (it changes torch's dispatch table), not per thread.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import torch

from . import _ops

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_VAR = "LORENZA_KERNELS_BACKEND"
#: Device type -> torch dispatch key of the backends registered for it.
DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
#: The order in which backends are tried per device type when none is forced. On CUDA the C++
#: kernels come before Triton until a GPU measurement (bench/results/) decides per op.
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}

# op -> backend -> device type ("any" for the reference) -> implementation
_IMPLS: dict[str, dict[str, dict[str, Callable]]] = {}
# op -> device type -> the backend whose kernel torch runs now
_ACTIVE: dict[str, dict[str, str]] = {}
_state: dict = {"lib": None, "forced": None, "installed": False}


def parse_backend(name: str | None, source: str) -> str | None:
    """A backend name, or None for the default order (None, "" or "auto")."""
    if name is None or name.strip() in ("", "auto"):
        return None
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)} or 'auto'")
    return name


def register(op: str, backend: str, device_types: str | tuple[str, ...]) -> Callable[[Callable], Callable]:
    """Decorator: record ``fn`` as ``backend``'s implementation of ``op`` on ``device_types``.

    ``fn`` takes the op's schema arguments, already validated. Call before :func:`install`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}")
    if op not in _ops.SCHEMAS:
        raise ValueError(f"op: {op!r} is not a lorenza_kernels op")
    devices = (device_types,) if isinstance(device_types, str) else tuple(device_types)

    def deco(fn: Callable) -> Callable:
        per_backend = _IMPLS.setdefault(op, {}).setdefault(backend, {})
        for d in devices:
            per_backend[d] = fn
        return fn

    return deco


def implementation(op: str, backend: str, device_type: str) -> Callable | None:
    """``backend``'s (unvalidated) implementation of ``op`` on ``device_type``, or None."""
    impls = _IMPLS.get(op, {}).get(backend, {})
    return impls.get(device_type, impls.get("any"))


def _choose(op: str, device_type: str, forced: str | None) -> str:
    order = (forced,) if forced is not None else DEFAULT_ORDER[device_type]
    for backend in order:
        if backend != "reference" and implementation(op, backend, device_type) is not None:
            return backend
    return "reference"


def install(forced: str | None = None) -> None:
    """Register the kernels with torch: the reference once, then the chosen backend per device."""
    if not _state["installed"]:
        for op in _ops.SCHEMAS:
            ref = implementation(op, "reference", "any")
            if ref is None:
                raise RuntimeError(f"lorenza_kernels::{op} has no reference implementation")
            _ops.LIB.impl(op, _ops.kernel(op, ref), "CompositeExplicitAutograd")
        _state["installed"] = True
    if _state["lib"] is not None:
        _state["lib"]._destroy()  # torch falls back to the reference until the new kernels are in
    lib = torch.library.Library(_ops.NAMESPACE, "IMPL")
    for op in _ops.SCHEMAS:
        _ACTIVE[op] = {}
        for device_type, key in DISPATCH_KEYS.items():
            backend = _choose(op, device_type, forced)
            _ACTIVE[op][device_type] = backend
            if backend != "reference":
                lib.impl(op, _ops.kernel(op, implementation(op, backend, device_type)), key)
    _state["lib"], _state["forced"] = lib, forced


def active(op: str, device_type: str) -> str:
    """The backend whose kernel runs ``op`` on ``device_type`` now (the reference elsewhere)."""
    return _ACTIVE.get(op, {}).get(device_type, "reference")


def forced_backend() -> str | None:
    return _state["forced"]


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run ``name``'s kernels (``reference``, ``cpu``, ``cuda``, ``triton``; None or ``auto``: the
    default order) inside the block, the reference where ``name`` has none. Process-wide."""
    forced = parse_backend(name, "use_backend")
    previous = _state["forced"]
    install(forced)
    try:
        yield
    finally:
        install(previous)


def env_backend() -> str | None:
    return parse_backend(os.environ.get(ENV_VAR), ENV_VAR)


def available(op: str | None = None) -> dict[str, dict[str, list[str]]]:
    """``{op: {device_type: [backends in the order tried, the reference last]}}``."""
    out: dict[str, dict[str, list[str]]] = {}
    for name in [op] if op else sorted(_ops.SCHEMAS):
        out[name] = {
            dev: [b for b in order if implementation(name, b, dev) is not None] + ["reference"]
            for dev, order in DEFAULT_ORDER.items()
        }
    return out
