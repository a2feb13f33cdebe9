"""Reference projected Adam and moment transform: the meaning every fast backend is tested against.

``projected_adam_step_`` (``docs/kernels.md`` section 2, ``docs/algorithms.md`` "LORENZA"): for every layer of the
batch, with W the ``m x n`` view of the parameter (``_shapes.matrix_dims``), G the gradient's view
and Q the basis (orthonormal columns, assumed and never checked),

    side "left":  Q is m x r, R = Q^T G (r x n), lift(X) = Q X
    side "right": Q is n x r, R = G Q   (m x r), lift(X) = X Q^T

    M <- beta1 M + (1 - beta1) R          (as torch.optim.AdamW: ``M.lerp_(R, 1 - beta1)``)
    V <- beta2 V + (1 - beta2) R * R
    N  = (M / bc1) / (sqrt(V) / sqrt(bc2) + eps),   bc_i = 1 - beta_i^step
    W <- W (1 - lr wd) - lr scale lift(N) - lr residual_scale (G - lift(R))

All arithmetic is float32 whatever the storage dtypes; W and the moments are rounded once to their
own dtypes at the end: to nearest even, except that with a rounding seed a bfloat16/float16 W is
rounded stochastically, element ``i`` of its ``m x n`` view with the rounding word ``i`` of the
stream ``(rounding_seed, rounding_streams[layer])`` (``docs/rng.md``, "The rounding stream"), or
the word ``rounding_offsets[layer] + i`` when W is the part of a larger matrix that starts at that
element (a row shard); the moments always round to nearest. This is the plain unfused form GaLore uses
(https://github.com/jiaweizzhao/GaLore, ``galore_torch/adamw.py`` + ``galore_projector.py``): it
materialises R, N, the m x n lifted update and, with a residual, G - lift(R). Two deliberate
differences from GaLore's AdamW: eps is added after the bias-corrected square root and weight
decay is applied before the update, both exactly as torch.optim.AdamW does (``docs/algorithms.md``).

``moment_transform_``: the moments follow a change of basis Q_old -> Q_new, O = Q_new^T Q_old:

    "rotate": left  M <- O M,   V <- (O*O) V        (O*O elementwise: V stays >= 0)
              right M <- M O^T, V <- V (O*O)^T
    "keep":   nothing (GaLore's behaviour)
    "reset":  M, V <- 0; the caller restarts that layer's step count (bias correction) at 1.
"""

from __future__ import annotations

import torch

from .._registry import register
from .._shapes import matrix_dims
from .rng import stochastic_round_range


def adam_coefficients(step: int, lr: float, beta1: float, beta2: float, scale: float) -> tuple[float, float]:
    """(c_n, sqrt(bc2)) with ``lr scale lift(N) = -lift(c_n M / (sqrt(V) / sqrt(bc2) + eps))``.

    c_n = -lr scale / bc1. Computed in float64 on the host, as torch.optim.AdamW does for its
    step size; shared by every backend so that they agree on the scalars.
    """
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return -lr * scale / bc1, bc2**0.5


def _lift(Q: torch.Tensor, X: torch.Tensor, side: str) -> torch.Tensor:
    return Q @ X if side == "left" else X @ Q.t()


def _down(Q: torch.Tensor, G: torch.Tensor, side: str) -> torch.Tensor:
    return Q.t() @ G if side == "left" else G @ Q


@register("projected_adam_step_", "reference", "any")
def projected_adam_step_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    projs: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    steps: list[int],
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    scale: float,
    side: str,
    residual_scale: float,
    rounding_seed: int | None = None,
    rounding_streams: list[int] | None = None,
    rounding_offsets: list[int] | None = None,
) -> None:
    for layer, (W, grad, proj, M, V, step) in enumerate(zip(params, grads, projs, exp_avgs, exp_avg_sqs, steps)):
        m, n = matrix_dims(W)
        G = grad.reshape(m, n).float()
        Q = proj.float()
        R = _down(Q, G, side)
        M32, V32 = M.float(), V.float()
        M32.lerp_(R, 1.0 - beta1)
        V32.mul_(beta2).addcmul_(R, R, value=1.0 - beta2)
        bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
        N = (M32 / bc1) / (V32.sqrt() / bc2**0.5 + eps)
        W32 = W.reshape(m, n).float()
        W32.mul_(1.0 - lr * weight_decay)
        W32.add_(_lift(Q, N, side), alpha=-lr * scale)
        if residual_scale != 0.0:
            W32.add_(G - _lift(Q, R, side), alpha=-lr * residual_scale)
        if rounding_seed is not None and rounding_streams is not None and W.dtype != torch.float32:
            start = rounding_offsets[layer] if rounding_offsets is not None else 0
            W32 = stochastic_round_range(W32, start, rounding_seed, rounding_streams[layer], W.dtype)
        W.copy_(W32.view(W.shape))
        M.copy_(M32)
        V.copy_(V32)


@register("moment_transform_", "reference", "any")
def moment_transform_(
    exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor],
    proj_olds: list[torch.Tensor],
    proj_news: list[torch.Tensor],
    side: str,
    transform: str,
) -> None:
    if transform == "keep":
        return
    for M, V, q_old, q_new in zip(exp_avgs, exp_avg_sqs, proj_olds, proj_news):
        if transform == "reset":
            M.zero_()
            V.zero_()
            continue
        O = q_new.float().t() @ q_old.float()  # noqa: E741 - r x r, the O of docs/algorithms.md
        O2 = O * O
        if side == "left":
            M.copy_(O @ M.float())
            V.copy_(O2 @ V.float())
        else:
            M.copy_(M.float() @ O.t())
            V.copy_(V.float() @ O2.t())
