"""The AdamW update of one parameter, operation for operation that of ``torch.optim.AdamW``.

``algorithms.md``: "Adam" means exactly ``torch.optim.AdamW`` (bias-corrected moments, eps added
after the bias-corrected square root, decoupled weight decay). The sequence below is that of
``torch.optim.adam._single_tensor_adam`` with ``decoupled_weight_decay=True`` (the default
implementation of ``AdamW`` on the CPU, and with ``foreach=False`` anywhere), so for float32
parameters and float32 state the result is bitwise the one of ``AdamW(..., foreach=False)``:
https://github.com/pytorch/pytorch/blob/main/torch/optim/adam.py

For bfloat16/float16 parameters the moments stay in ``state_dtype`` (float32 by default), the
update is computed in that dtype and the parameter is rounded once.
"""

from __future__ import annotations

import torch

__all__ = ["adamw_group_update_", "adamw_update_", "init_adam_state"]


def init_adam_state(param: torch.Tensor, state: dict, state_dtype: torch.dtype | None) -> None:
    """``state['step'] = 0`` and zero moments ``exp_avg``, ``exp_avg_sq`` of ``param``'s shape."""
    dtype = state_dtype or param.dtype
    state["step"] = 0
    state["exp_avg"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)
    state["exp_avg_sq"] = torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format)


@torch.no_grad()
def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    state: dict,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    state_dtype: torch.dtype | None = torch.float32,
) -> None:
    """One AdamW step of ``param`` with gradient ``grad``; initialises ``state`` on first use.

    ``state['step']`` is a Python int (the per-parameter count used by the bias corrections).
    """
    if "step" not in state:
        init_adam_state(param, state, state_dtype)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    state["step"] += 1
    step = float(state["step"])  # torch reads its float32 step tensor back as a Python float

    same = param.dtype == exp_avg.dtype
    work = param if same else param.to(exp_avg.dtype)
    g = grad if grad.dtype == exp_avg.dtype else grad.to(exp_avg.dtype)

    if weight_decay != 0:
        work.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2**0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    work.addcdiv_(exp_avg, denom, value=-step_size)
    if not same:
        param.copy_(work)


def adamw_group_update_(param: torch.Tensor, grad: torch.Tensor, state: dict, group: dict, state_dtype) -> None:
    """:func:`adamw_update_` with the hyperparameters of ``param``'s group (lr, betas, eps, wd)."""
    beta1, beta2 = group["betas"]
    adamw_update_(
        param,
        grad,
        state,
        lr=float(group["lr"]),
        beta1=float(beta1),
        beta2=float(beta2),
        eps=float(group["eps"]),
        weight_decay=float(group["weight_decay"]),
        state_dtype=state_dtype,
    )
