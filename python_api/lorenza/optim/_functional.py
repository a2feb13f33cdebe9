"""The optimizers' arithmetic as free functions over lists of tensors.

In the style of ``torch.optim``'s ``_multi_tensor_adam``: every function updates a whole list with
a fixed number of multi-tensor calls (``torch._foreach_*``, the ``lorenza_kernels`` ops), so an
optimizer step makes O(1) calls whatever the number of layers. Temporaries are bounded: a list is
processed in buckets of at most :data:`BUCKET_NUMEL` elements (a 70M-parameter model is one
bucket; larger ones take one call per bucket, each big enough that a call's fixed cost is noise).

``adamw_`` is ``torch.optim.AdamW``'s update, operation for operation (``docs/algorithms.md``:
bias-corrected moments, eps added after the bias-corrected square root, decoupled weight decay
applied first): for float32 parameters and state it is bitwise ``torch.optim.AdamW(foreach=False)``
on the CPU. For bfloat16/float16 parameters with float32 state, the update is computed on a float32
image of each parameter and rounded once. ``galore_adamw_`` is galore-torch's (transformers' old
AdamW) for the dense parameters of ``GaLoreAdamW``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

import lorenza_kernels as lk

__all__ = ["BUCKET_NUMEL", "adamw_", "buckets", "galore_adamw_", "init_adam_state"]

#: Elements per bucket of a multi-tensor update: bounds the float32 temporaries (square roots,
#: float32 images of low-precision parameters) to 256 MiB at a time.
BUCKET_NUMEL = 1 << 26


def buckets(count: int, numels: Sequence[int], limit: int = BUCKET_NUMEL) -> Iterator[range]:
    """Consecutive index ranges of at most ``limit`` elements (one item may exceed it alone)."""
    start, total = 0, 0
    for i in range(count):
        if i > start and total + numels[i] > limit:
            yield range(start, i)
            start, total = i, 0
        total += numels[i]
    if start < count:
        yield range(start, count)


def init_adam_state(param: torch.Tensor, state: dict, state_dtype: torch.dtype | None) -> None:
    """``state['step'] = 0`` and zero moments ``exp_avg``, ``exp_avg_sq`` of ``param``'s shape."""
    dtype = state_dtype or param.dtype
    state["step"] = 0
    state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)


def _images(params: list[torch.Tensor], dtype: torch.dtype) -> tuple[list[torch.Tensor], bool]:
    """The parameters in the state's dtype: themselves, or float32 copies to round back once."""
    if all(p.dtype == dtype for p in params):
        return params, False
    return [p.to(dtype) for p in params], True


def _write_back(
    params: list[torch.Tensor],
    work: list[torch.Tensor],
    rounding_seed: int | None,
    streams: Sequence[int] | None,
    offsets: Sequence[int] | None = None,
) -> None:
    """Round the images back into the low-precision parameters: to nearest, or stochastically
    (``lorenza_kernels.stochastic_round_``, parameter ``k`` from stream ``streams[k]``, from index
    ``offsets[k]`` on for a shard)."""
    low = [k for k, (p, w) in enumerate(zip(params, work)) if p is not w]
    if not low:
        return
    if rounding_seed is None:
        torch._foreach_copy_([params[k] for k in low], [work[k] for k in low])
        return
    if streams is None:
        raise ValueError("streams: required with rounding_seed")
    lk.stochastic_round_([params[k] for k in low], [work[k] for k in low], rounding_seed,
                         streams=[streams[k] for k in low],
                         offsets=None if offsets is None else [offsets[k] for k in low])  # fmt: skip


@torch.no_grad()
def adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    rounding_seed: int | None = None,
    streams: Sequence[int] | None = None,
    offsets: Sequence[int] | None = None,
) -> None:
    """One AdamW step of every parameter; ``steps[i]`` is parameter i's step, counted from 1.

    All moments share one dtype; parameters and gradients may be of lower precision, updated on a
    float32 image and rounded back once: to nearest, or with ``rounding_seed`` stochastically
    (parameter ``i`` from stream ``streams[i]``, from index ``offsets[i]`` on for a shard).
    """
    if not params:
        return
    dtype = exp_avgs[0].dtype
    for idx in buckets(len(params), [p.numel() for p in params]):
        ps = [params[i] for i in idx]
        gs = [grads[i] if grads[i].dtype == dtype else grads[i].to(dtype) for i in idx]
        ms, vs = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
        work, copied = _images(ps, dtype)
        if weight_decay != 0:
            torch._foreach_mul_(work, 1 - lr * weight_decay)
        torch._foreach_lerp_(ms, gs, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1 - beta2)
        del gs
        bc1 = [1 - beta1 ** float(steps[i]) for i in idx]
        bc2_sqrt = [(1 - beta2 ** float(steps[i])) ** 0.5 for i in idx]
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(work, ms, denom, [-(lr / b) for b in bc1])
        if copied:
            _write_back(ps, work, rounding_seed, [streams[i] for i in idx] if streams is not None else None,
                        [offsets[i] for i in idx] if offsets is not None else None)  # fmt: skip


@torch.no_grad()
def galore_adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    rounding_seed: int | None = None,
    streams: Sequence[int] | None = None,
    offsets: Sequence[int] | None = None,
) -> None:
    """galore-torch's update of the parameters outside the subspace (transformers' old AdamW):
    ``eps`` added to ``sqrt(V)`` before the bias correction, step size ``lr sqrt(bc2) / bc1``, and
    the decoupled decay ``p <- p - lr wd p`` after the update. float32 state."""
    if not params:
        return
    for idx in buckets(len(params), [p.numel() for p in params]):
        ps = [params[i] for i in idx]
        gs = [grads[i] if grads[i].dtype == torch.float32 else grads[i].float() for i in idx]
        ms, vs = [exp_avgs[i] for i in idx], [exp_avg_sqs[i] for i in idx]
        work, copied = _images(ps, torch.float32)
        torch._foreach_mul_(ms, beta1)
        torch._foreach_add_(ms, gs, alpha=1.0 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, gs, gs, 1.0 - beta2)
        del gs
        denom = torch._foreach_sqrt(vs)
        torch._foreach_add_(denom, eps)
        ratio = torch._foreach_div(ms, denom)
        del denom
        sizes = [lr * math.sqrt(1.0 - beta2 ** steps[i]) / (1.0 - beta1 ** steps[i]) for i in idx]
        if len(set(sizes)) == 1:  # the usual case: one step count, one fused multiply-add each
            torch._foreach_add_(work, ratio, alpha=-sizes[0])
        else:
            for w, r, s in zip(work, ratio, sizes):
                w.add_(r, alpha=-s)
        del ratio
        if weight_decay > 0.0:
            torch._foreach_add_(work, work, alpha=-lr * weight_decay)
        if copied:
            _write_back(ps, work, rounding_seed, [streams[i] for i in idx] if streams is not None else None,
                        [offsets[i] for i in idx] if offsets is not None else None)  # fmt: skip
