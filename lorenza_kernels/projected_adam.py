"""Public projected-Adam ops (``docs/kernels.md`` section 2): Adam inside a rank-r subspace, fused.

These functions put the arguments in the ops' form (lists, one step per layer) and call
``torch.ops.lorenza_kernels.*``, whose validator checks every argument before any tensor is touched,
so a rejected call leaves the parameters and moments as they were. The basis ``proj`` is ASSUMED to
have orthonormal columns (Q^T Q = I) and is not checked: the check would cost a GEMM per call. With
a non-orthonormal Q the step is still the formula below, but the residual term no longer is the
orthogonal part.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, _ops
from ._shapes import MODES, SIDES

__all__ = ["MODES", "SIDES", "moment_transform_", "projected_adam_step_", "projected_adam_step_batched_"]

_TensorOrList = torch.Tensor | Sequence[torch.Tensor]


def _as_list(x: _TensorOrList, name: str) -> list[torch.Tensor]:
    """A batch: a list of tensors, or one tensor whose dim 0 indexes the layers (unbound as views)."""
    if isinstance(x, torch.Tensor):
        if x.dim() < 2:
            raise ValueError(f"{name}: a stacked batch needs at least 2 dims (batch, ...), got {tuple(x.shape)}")
        return list(x.unbind(0))
    if not isinstance(x, Sequence) or isinstance(x, str):
        raise TypeError(f"{name}: expected a tensor or a list of tensors, got {type(x).__name__}")
    return list(x)


def _float(x: object, name: str) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.is_floating_point():
        return float(x)
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(x).__name__}")
    return float(x)


def _hyper(lr, beta1, beta2, eps, weight_decay, scale, residual_scale) -> tuple[float, ...]:
    names = ("lr", "beta1", "beta2", "eps", "weight_decay", "scale", "residual_scale")
    return tuple(_float(v, n) for v, n in zip((lr, beta1, beta2, eps, weight_decay, scale, residual_scale), names))


def _rounding(seed: int | None, streams: Sequence[int] | None, names: str) -> tuple[int | None, list[int] | None]:
    """The op's (rounding_seed, rounding_streams): a seed in [0, 2^64) to its int64 encoding, the
    streams as a list of ints (their range is the op's validator's business)."""
    if (seed is None) != (streams is None):
        raise ValueError(f"{names}: give both or neither")
    if seed is None or streams is None:
        return None, None
    if isinstance(streams, (str, torch.Tensor)) or not isinstance(streams, Sequence):
        raise TypeError(f"rounding_streams: expected a list of ints (one per layer), got {type(streams).__name__}")
    rstreams = [_checks.as_int(s, f"rounding_streams[{k}]") for k, s in enumerate(streams)]
    return _checks.seed_to_int64(seed, "rounding_seed"), rstreams


def _steps(step: int | Sequence[int], count: int) -> list[int]:
    if isinstance(step, Sequence) and not isinstance(step, str):
        steps = [_checks.as_int(s, f"step[{i}]") for i, s in enumerate(step)]
        if len(steps) != count:
            raise ValueError(f"step: expected an int or {count} ints (one per layer), got {len(steps)}")
        return steps
    return [_checks.as_int(step, "step")] * count


def projected_adam_step_(
    param: torch.Tensor,
    grad: torch.Tensor,
    proj: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    scale: float = 1.0,
    side: str,
    residual_scale: float = 0.0,
    rounding_seed: int | None = None,
    rounding_stream: int | None = None,
    rounding_offset: int | None = None,
) -> None:
    """One Adam step inside the subspace of ``proj``, in place on ``param``, ``exp_avg``, ``exp_avg_sq``.

    ``W`` is ``param`` viewed as ``m x n`` (``shape[0] x rest``), ``G`` the gradient's view, ``Q``
    = ``proj`` with orthonormal columns (assumed, NOT checked):

    - side ``"left"``: Q is ``m x r``, ``R = Q^T G`` and the moments are ``r x n``, lift(X) = Q X;
    - side ``"right"``: Q is ``n x r``, ``R = G Q`` and the moments are ``m x r``, lift(X) = X Q^T.

    Adam on R exactly as torch.optim.AdamW: ``M <- lerp(M, R, 1 - beta1)``,
    ``V <- beta2 V + (1 - beta2) R^2``, ``N = (M / bc1) / (sqrt(V) / sqrt(bc2) + eps)`` with
    ``bc_i = 1 - beta_i^step``; then

        W <- W (1 - lr weight_decay) - lr scale lift(N) - lr residual_scale (G - lift(R)).

    ``residual_scale > 0`` adds back the part of the gradient outside the subspace (Lorenza+).
    Arithmetic is float32 whatever the dtypes; ``param`` (float32/bfloat16/float16) and the
    moments (float32 or bfloat16) are each rounded once. ``step`` counts from 1. Errors name the
    arguments as the op sees them (``params[0]``, ``grads[0]``, ...).

    ``rounding_seed`` (in [0, 2^64)) and ``rounding_stream`` (in [0, 2^32)), both or neither: a
    bfloat16/float16 ``param`` is rounded stochastically instead of to nearest, element ``i`` of
    its ``m x n`` view with the rounding word ``i`` of stream ``(rounding_seed, rounding_stream)``
    (``docs/rng.md``, "The rounding stream"). Unbiased, so updates far below half an ulp of the
    parameter accumulate in expectation instead of vanishing. The moments round to nearest.
    ``rounding_offset`` (with a rounding seed): element ``i`` takes the word ``rounding_offset + i``
    instead, for a ``param`` that is a row shard of a larger matrix starting at that element.
    """
    lr, beta1, beta2, eps, weight_decay, scale, residual_scale = _hyper(
        lr, beta1, beta2, eps, weight_decay, scale, residual_scale
    )
    streams = None
    if rounding_stream is not None:
        streams = [_checks.as_int(rounding_stream, "rounding_stream")]
        if not 0 <= streams[0] < _checks.STREAM_LIMIT:
            raise ValueError(f"rounding_stream: must lie in [0, 2**32), got {streams[0]}")
    rseed, rstreams = _rounding(rounding_seed, streams, "rounding_seed, rounding_stream")
    offs = None if rounding_offset is None else [_checks.as_int(rounding_offset, "rounding_offset")]
    _ops.projected_adam_step_(
        [param], [grad], [proj], [exp_avg], [exp_avg_sq], _steps(step, 1), lr, beta1, beta2, eps, weight_decay,
        scale, side, residual_scale, rseed, rstreams, offs,
    )  # fmt: skip


def projected_adam_step_batched_(
    params: _TensorOrList,
    grads: _TensorOrList,
    projs: _TensorOrList,
    exp_avgs: _TensorOrList,
    exp_avg_sqs: _TensorOrList,
    *,
    step: int | Sequence[int],
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    scale: float = 1.0,
    side: str,
    residual_scale: float = 0.0,
    rounding_seed: int | None = None,
    rounding_streams: Sequence[int] | None = None,
    rounding_offsets: Sequence[int] | None = None,
) -> None:
    """:func:`projected_adam_step_` for a batch of layers of ONE shape and dtype set, in one call.

    Each argument is a list of tensors (one per layer; they need not be adjacent in memory) or one
    stacked tensor whose dim 0 indexes the layers (it is unbound into views, so the update lands
    in it). ``step`` is one int or one per layer (a layer whose moments were reset restarts at 1).
    ``rounding_seed`` and ``rounding_streams`` (one stream per layer), both or neither: stochastic
    rounding of 16-bit parameters, layer ``l`` with the stream ``rounding_streams[l]`` (and, with
    ``rounding_offsets``, the words from ``rounding_offsets[l]`` on: row shards of larger matrices).
    On CUDA the Triton backend runs the whole batch in two launches; elsewhere it loops.
    """
    names = ("params", "grads", "projs", "exp_avgs", "exp_avg_sqs")
    lists = [_as_list(x, nm) for x, nm in zip((params, grads, projs, exp_avgs, exp_avg_sqs), names)]
    hyper = _hyper(lr, beta1, beta2, eps, weight_decay, scale, residual_scale)
    rseed, rstreams = _rounding(rounding_seed, rounding_streams, "rounding_seed, rounding_streams")
    offs = _checks.offset_list(rounding_offsets, len(lists[0]), "rounding_offsets")
    _ops.projected_adam_step_(*lists, _steps(step, len(lists[0])), *hyper[:6], side, hyper[6], rseed, rstreams, offs)


def moment_transform_(
    exp_avg: _TensorOrList,
    exp_avg_sq: _TensorOrList,
    proj_old: _TensorOrList,
    proj_new: _TensorOrList,
    *,
    side: str,
    mode: str = "rotate",
) -> None:
    """Carry Adam moments across a change of basis ``proj_old -> proj_new``, in place.

    With ``O = Q_new^T Q_old`` (r x r): ``"rotate"`` sets ``M <- O M``, ``V <- (O*O) V`` (side
    "left"; side "right": ``M <- M O^T``, ``V <- V (O*O)^T``); the elementwise square keeps V >= 0.
    ``"keep"`` leaves them (GaLore); ``"reset"`` zeroes them, and the CALLER must then restart that
    layer's step count at 1 so the bias correction starts over. Single tensors, or lists / stacked
    tensors for a batch (as :func:`projected_adam_step_batched_`).
    """
    single = isinstance(exp_avg, torch.Tensor) and exp_avg.dim() == 2
    names = ("exp_avg", "exp_avg_sq", "proj_old", "proj_new")
    args = (exp_avg, exp_avg_sq, proj_old, proj_new)
    lists = [[x] for x in args] if single else [_as_list(x, nm) for x, nm in zip(args, names)]
    _ops.moment_transform_(*lists, side, mode)
