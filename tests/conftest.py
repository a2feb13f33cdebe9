"""Shared test helpers: the device list, backend parametrisation, poisoning."""

from __future__ import annotations

import os

import pytest
import torch

import lorenza_kernels
from lorenza_kernels import _registry

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def dtype_id(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


def _backend_params() -> list:
    """(backend, device) pairs an op can run on; :func:`require_backend` skips the absent ones."""
    params = []
    for backend in _registry.BACKENDS:
        for dev in ("cpu", "cuda"):
            if (backend == "cuda" and dev == "cpu") or (backend == "cpu" and dev == "cuda"):
                continue
            marks = [pytest.mark.triton_interpret] if (backend, dev) == ("triton", "cpu") else []
            params.append(pytest.param(backend, dev, id=f"{backend}-{dev}", marks=marks))
    return params


#: Parametrisation of a test over every (backend, device) pair: ``@pytest.mark.parametrize("backend,dev", BACKENDS)``.
BACKENDS = _backend_params()

#: (atol, rtol) of a seeded_axpby_ result against the reference run in the same dtype. Both round
#: once from float32 values that differ by the stream's error (within 1e-5 of float64, docs/rng.md)
#: and the order of the float32 operations, so low precision may differ by one unit in the last
#: place: 2^-7 relative for bfloat16, 2^-10 for float16, and an absolute term for values near zero.
AXPBY_TOL = {torch.float32: (5e-5, 1e-5), torch.bfloat16: (1e-3, 2**-7), torch.float16: (1e-4, 2**-10)}


def require_backend(op: str, backend: str, dev: str):
    """Skip unless ``backend`` implements ``op`` on ``dev`` here; return the implementation."""
    if dev == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backend == "triton" and dev == "cpu" and not TRITON_INTERPRET:
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1")
    fn = _registry.implementation(op, backend, dev)
    if fn is None:
        info = lorenza_kernels.backend_info()
        pytest.skip(f"backend {backend!r} does not implement {op} on {dev} here (extension: {info['extension_error']})")
    return fn


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so that an element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))
