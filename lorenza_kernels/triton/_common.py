"""Pieces the Triton kernels share: the tile product of the GEMM-shaped kernels and the device
guard of the launchers."""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def mma(a, b, acc, LOW_DOT: tl.constexpr, PREC: tl.constexpr):
    """acc += a b: 16-bit operands as they are, or both as float32 at precision PREC."""
    if LOW_DOT:
        acc = tl.dot(a, b, acc)
    else:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PREC)
    return acc


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
