"""Shared test helpers: the device list, backend parametrisation, poisoning."""

from __future__ import annotations

import os

import pytest
import torch

import lorenza_kernels
from lorenza_kernels import _registry

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def devices() -> list[str]:
    """CPU always; CUDA when present. Evaluated lazily by the fixtures, never at collection."""
    return ["cpu", "cuda"]


def dtype_id(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}[dtype]


@pytest.fixture(params=["cpu", "cuda"])
def device(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


def backend_params(op: str) -> list:
    """(backend, device) pairs to test ``op`` on; each skips with a reason when not available here."""
    params = []
    for backend in _registry.BACKENDS:
        for dev in ("cpu", "cuda"):
            marks = []
            if backend == "triton" and dev == "cpu":
                marks.append(pytest.mark.triton_interpret)
            if (backend == "cuda" and dev == "cpu") or (backend == "cpu" and dev == "cuda"):
                continue
            params.append(pytest.param(backend, dev, id=f"{backend}-{dev}", marks=marks))
    return params


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
