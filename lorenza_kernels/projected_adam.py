"""Public projected-Adam ops (kernels.md section 2): Adam inside a rank-r subspace, fused.

Every argument is validated here, before any tensor is touched, so a rejected call leaves the
parameters and moments as they were. The basis ``proj`` is ASSUMED to have orthonormal columns
(Q^T Q = I) and is not checked: the check would cost a GEMM per call. With a non-orthonormal Q
the step is still the formula below, but the residual term no longer is the orthogonal part.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _ops
from ._shapes import matrix_dims

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MOMENT_DTYPES = (torch.float32, torch.bfloat16)
SIDES = ("left", "right")
MODES = ("rotate", "keep", "reset")

_TensorOrList = torch.Tensor | Sequence[torch.Tensor]


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _as_list(x: _TensorOrList, name: str) -> list[torch.Tensor]:
    """A batch: a list of tensors, or one tensor whose dim 0 indexes the layers (unbound as views)."""
    if isinstance(x, torch.Tensor):
        if x.dim() < 2:
            raise ValueError(f"{name}: a stacked batch needs at least 2 dims (batch, ...), got {tuple(x.shape)}")
        return list(x.unbind(0))
    if not isinstance(x, Sequence) or isinstance(x, str):
        raise TypeError(f"{name}: expected a tensor or a list of tensors, got {type(x).__name__}")
    return list(x)


def _check_tensor(
    t, name: str, dtypes: tuple[torch.dtype, ...], device: torch.device | None, ref: str = "param"
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {_name(t.dtype)} is not supported ({', '.join(map(_name, dtypes))})")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: on {t.device}, but {ref} is on {device}; all tensors must share one device")


def _check_side(side: str) -> None:
    if side not in SIDES:
        raise ValueError(f"side: expected 'left' or 'right', got {side!r}")


def _check_float(x, name: str, *, low: float | None = None, high: float | None = None) -> float:
    """A finite float in [low, high)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name}: must be finite, got {x}")
    if (low is not None and x < low) or (high is not None and x >= high):
        lo = "-inf" if low is None else low
        raise ValueError(f"{name}: must lie in [{lo}, {'inf' if high is None else high}), got {x}")
    return x


def _check_layer(k: str, p, g, q, ma, va, side: str) -> None:
    """One layer's tensors: dtypes, devices, shapes, contiguity (``k`` is '' or 's[i]': "params[3]")."""
    _check_tensor(p, f"param{k}", PARAM_DTYPES, None)
    if p.dim() == 0:
        raise ValueError(f"param{k}: expected at least 1 dimension (viewed as shape[0] x rest)")
    dev = p.device
    _check_tensor(g, f"grad{k}", PARAM_DTYPES, dev)
    _check_tensor(q, f"proj{k}", PARAM_DTYPES, dev)
    _check_tensor(ma, f"exp_avg{k}", MOMENT_DTYPES, dev)
    _check_tensor(va, f"exp_avg_sq{k}", MOMENT_DTYPES, dev)
    if g.shape != p.shape:
        raise ValueError(f"grad{k}: shape {tuple(g.shape)} must equal param's {tuple(p.shape)}")
    m, n = matrix_dims(p)
    rows = m if side == "left" else n
    if q.dim() != 2 or q.shape[0] != rows:
        raise ValueError(
            f"proj{k}: expected ({rows}, r) for side {side!r} and param viewed as {m} x {n}, got {tuple(q.shape)}"
        )
    r = q.shape[1]
    if not 0 < r <= rows:
        raise ValueError(f"proj{k}: rank {r} must lie in [1, {rows}] (the projected dimension)")
    mshape = (r, n) if side == "left" else (m, r)
    for t, nm in ((ma, "exp_avg"), (va, "exp_avg_sq")):
        if tuple(t.shape) != mshape:
            raise ValueError(f"{nm}{k}: expected shape {mshape} (side {side!r}, rank {r}), got {tuple(t.shape)}")
    for t, nm in ((p, "param"), (g, "grad"), (ma, "exp_avg"), (va, "exp_avg_sq")):
        if not t.is_contiguous():
            raise ValueError(f"{nm}{k}: must be contiguous")
    ptrs = [t.data_ptr() for t in (p, ma, va, g) if t.numel()]  # empty tensors all sit at 0
    if len(set(ptrs)) < len(ptrs):
        raise ValueError(f"param{k}, exp_avg{k}, exp_avg_sq{k}, grad{k}: must not share memory")
    if torch.is_grad_enabled() and p.requires_grad:
        raise RuntimeError(f"param{k}: requires grad and is updated in place; call under torch.no_grad()")


def _check_hyper(lr, beta1, beta2, eps, weight_decay, scale, residual_scale) -> tuple[float, ...]:
    return (
        _check_float(lr, "lr", low=0.0),
        _check_float(beta1, "beta1", low=0.0, high=1.0),
        _check_float(beta2, "beta2", low=0.0, high=1.0),
        _check_float(eps, "eps", low=0.0),
        _check_float(weight_decay, "weight_decay", low=0.0),
        _check_float(scale, "scale"),
        _check_float(residual_scale, "residual_scale"),
    )


def _check_steps(step, count: int) -> list[int]:
    steps = [step] * count if isinstance(step, int) else list(step)
    if len(steps) != count:
        raise ValueError(f"step: expected an int or {count} ints (one per layer), got {len(steps)}")
    for s in steps:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"step: must be an int >= 1 (the step being taken, counted from 1), got {s!r}")
    return steps


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
    moments (float32 or bfloat16) are each rounded once. ``step`` counts from 1.
    """
    _check_side(side)
    _check_layer("", param, grad, proj, exp_avg, exp_avg_sq, side)
    steps = _check_steps(step, 1)
    hyper = _check_hyper(lr, beta1, beta2, eps, weight_decay, scale, residual_scale)
    _ops.projected_adam_step_([param], [grad], [proj], [exp_avg], [exp_avg_sq], steps, *hyper[:6], side, hyper[6])


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
) -> None:
    """:func:`projected_adam_step_` for a batch of layers of ONE shape and dtype set, in one call.

    Each argument is a list of tensors (one per layer; they need not be adjacent in memory) or one
    stacked tensor whose dim 0 indexes the layers (it is unbound into views, so the update lands
    in it). ``step`` is one int or one per layer (a layer whose moments were reset restarts at 1).
    On CUDA the Triton backend runs the whole batch in two launches; elsewhere it loops.
    """
    _check_side(side)
    lists = [_as_list(x, nm) for x, nm in ((params, "params"), (grads, "grads"), (projs, "projs"),
                                            (exp_avgs, "exp_avgs"), (exp_avg_sqs, "exp_avg_sqs"))]  # fmt: skip
    k = len(lists[0])
    for xs, nm in zip(lists[1:], ("grads", "projs", "exp_avgs", "exp_avg_sqs")):
        if len(xs) != k:
            raise ValueError(f"{nm}: expected {k} tensors (one per param), got {len(xs)}")
    for i, layer in enumerate(zip(*lists)):
        _check_layer(f"s[{i}]", *layer, side)
        if i:
            dev = lists[0][0].device
            names = ("params", "grads", "projs", "exp_avgs", "exp_avg_sqs")
            for t, t0, nm in zip(layer, (xs[0] for xs in lists), names):
                if t.shape != t0.shape or t.dtype != t0.dtype:
                    raise ValueError(f"{nm}[{i}]: shape and dtype must equal {nm}[0]'s (one batch, one shape)")
                if t.device != dev:
                    raise ValueError(f"{nm}[{i}]: on {t.device}, but params[0] is on {dev}")
    steps = _check_steps(step, k)
    hyper = _check_hyper(lr, beta1, beta2, eps, weight_decay, scale, residual_scale)
    if k:
        _ops.projected_adam_step_(*lists, steps, *hyper[:6], side, hyper[6])


def _check_transform(k: str, ma, va, qo, qn, side: str, dev: torch.device | None) -> None:
    _check_tensor(ma, f"exp_avg{k}", MOMENT_DTYPES, dev, "exp_avgs[0]")
    dev = ma.device
    _check_tensor(va, f"exp_avg_sq{k}", MOMENT_DTYPES, dev, "exp_avg")
    _check_tensor(qo, f"proj_old{k}", PARAM_DTYPES, dev, "exp_avg")
    _check_tensor(qn, f"proj_new{k}", PARAM_DTYPES, dev, "exp_avg")
    if qo.dim() != 2:
        raise ValueError(f"proj_old{k}: expected a 2-D basis (d, r), got {tuple(qo.shape)}")
    if qn.shape != qo.shape:
        raise ValueError(f"proj_new{k}: shape {tuple(qn.shape)} must equal proj_old's {tuple(qo.shape)}")
    d, r = qo.shape
    if not 0 < r <= d:
        raise ValueError(f"proj_old{k}: rank {r} must lie in [1, {d}]")
    if ma.dim() != 2 or ma.shape[0 if side == "left" else 1] != r:
        want = f"({r}, n)" if side == "left" else f"(m, {r})"
        raise ValueError(f"exp_avg{k}: expected {want} for side {side!r}, got {tuple(ma.shape)}")
    if va.shape != ma.shape:
        raise ValueError(f"exp_avg_sq{k}: shape {tuple(va.shape)} must equal exp_avg's {tuple(ma.shape)}")
    if ma.numel() and ma.data_ptr() == va.data_ptr():
        raise ValueError(f"exp_avg{k}, exp_avg_sq{k}: must not share memory")


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
    _check_side(side)
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    single = isinstance(exp_avg, torch.Tensor) and exp_avg.dim() == 2
    names = ("exp_avg", "exp_avg_sq", "proj_old", "proj_new")
    args = (exp_avg, exp_avg_sq, proj_old, proj_new)
    lists = [[x] for x in args] if single else [_as_list(x, nm) for x, nm in zip(args, names)]
    for xs, nm in zip(lists[1:], names[1:]):
        if len(xs) != len(lists[0]):
            raise ValueError(f"{nm}: expected {len(lists[0])} tensors (one per exp_avg), got {len(xs)}")
    dev = None
    for i, layer in enumerate(zip(*lists)):
        _check_transform("" if single else f"s[{i}]", *layer, side, dev)
        dev = layer[0].device
    if lists[0]:
        _ops.moment_transform_(*lists, side, mode)
