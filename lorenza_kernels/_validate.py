"""One validator per op: the checks every call passes through, whoever makes it.

``_ops.py`` wraps every backend's kernel (and the fake) so that the op's validator runs first, with
the op's own arguments: the public functions of ``lorenza_kernels`` and direct
``torch.ops.lorenza_kernels.*`` callers get the same errors, each naming the argument, and nothing
is touched before they pass. Each validator takes the op's schema arguments plus ``memory``: False
in the fake (fake and meta tensors have shapes and dtypes but no data), which skips the checks that
read addresses or values (overlap, finiteness).
"""

from __future__ import annotations

import math

import torch

from ._checks import (
    ANY_FLOAT,
    MOMENT_DTYPES,
    PERTURB_DTYPES,
    STREAM_LIMIT,
    check_choice,
    check_disjoint,
    check_disjoint_from,
    check_finite_list,
    check_no_grad,
    check_offsets,
    check_stream,
    check_streams,
    check_tensor_list,
    dtype_name,
    dtype_names,
    finite_float,
)
from ._shapes import MODES, SIDES, matrix_dims, projected_shapes


class NonFiniteError(ValueError):
    """A matrix of a randomized-SVD batch holds NaN or Inf; ``member`` is its batch index."""

    def __init__(self, message: str, member: int):
        super().__init__(message)
        self.member = member


# --- seeded perturbation regeneration ------------------------------------------------------------


def _row_vectors(row_vectors, gamma, tensors, device) -> None:
    if (row_vectors is None) != (gamma is None):
        raise ValueError("row_vectors, gamma: give both or neither")
    if row_vectors is None:
        return
    n = len(tensors)
    if len(row_vectors) != n:
        raise ValueError(f"row_vectors: expected {n} vectors (one per tensor), got {len(row_vectors)}")
    check_finite_list(gamma, n, "gamma")
    for k, (a, t) in enumerate(zip(row_vectors, tensors)):
        if a.dtype not in ANY_FLOAT:
            raise TypeError(f"row_vectors[{k}]: expected a floating-point tensor, got {dtype_name(a.dtype)}")
        if a.device != device:
            raise ValueError(f"row_vectors[{k}]: on {a.device}, but its tensor is on {t.device}")
        cols = matrix_dims(t)[1]
        if a.dim() != 1 or a.numel() != cols:
            raise ValueError(
                f"row_vectors[{k}]: expected shape ({cols},) (the columns of the tensor's m x n view), "
                f"got {tuple(a.shape)}"
            )


def _finite(values) -> bool:
    """All finite, in one pass in C (a sum of finite values can overflow: then check one by one)."""
    total = sum(values)
    return math.isfinite(total) or all(map(math.isfinite, values))


def seeded_axpby_(
    tensors, seed, streams, alpha, beta, row_vectors=None, gamma=None, rounding_seed=None, offsets=None, *, memory=True
) -> None:
    # The common case is checked in one tight loop (this runs on every call of the hottest op);
    # anything off goes through the general checks, which name the argument at fault.
    n = len(tensors)
    device = None
    tracked = torch.is_grad_enabled()
    for t in tensors:
        if t.dtype not in PERTURB_DTYPES or not t.is_contiguous() or (tracked and t.requires_grad):
            device = False
            break
        d = t.device
        if device is None:
            device = d
        elif d != device:
            device = False
            break
    if device is False:
        device = check_tensor_list(tensors, "tensors")
        check_no_grad(tensors, "tensors")
    if len(streams) != n or (n and not (0 <= min(streams) and max(streams) < STREAM_LIMIT)):
        check_streams(streams, n)
    if len(alpha) != n or not _finite(alpha):
        check_finite_list(alpha, n, "alpha")
    if len(beta) != n or not _finite(beta):
        check_finite_list(beta, n, "beta")
    if row_vectors is not None or gamma is not None:
        _row_vectors(row_vectors, gamma, tensors, device)
    if offsets is not None:
        check_offsets(offsets, tensors)
    if memory and n > 1:
        check_disjoint(tensors, "tensors[{}]".format)


def seeded_colsum(tensors, seed, streams, offsets=None, *, memory=True) -> None:
    check_tensor_list(tensors, "tensors", ANY_FLOAT, contiguous=False)
    check_streams(streams, len(tensors))
    if offsets is not None:
        check_offsets(offsets, tensors)


def stochastic_round_(dst, src, seed, streams, offsets=None, *, memory=True) -> None:
    check_tensor_list(dst, "dst")
    n = len(dst)
    if len(src) != n:
        raise ValueError(f"src: expected {n} tensors (one per dst), got {len(src)}")
    for k, (d, s) in enumerate(zip(dst, src)):
        if s.dtype != torch.float32:
            raise TypeError(f"src[{k}]: dtype {dtype_name(s.dtype)} is not supported (float32: the values to round)")
        if s.device != d.device:
            raise ValueError(f"src[{k}]: on {s.device}, but dst[{k}] is on {d.device}")
        if s.shape != d.shape:
            raise ValueError(f"src[{k}]: shape {tuple(s.shape)} must equal dst[{k}]'s {tuple(d.shape)}")
        if not s.is_contiguous():
            raise ValueError(f"src[{k}]: must be contiguous (the rounding stream follows the flat row-major index)")
    check_streams(streams, n)
    if offsets is not None:
        check_offsets(offsets, dst)
    check_no_grad(dst, "dst")
    if memory and n:
        check_disjoint(dst, "dst[{}]".format)
        check_disjoint_from(dst, src, "dst[{}]".format, "src[{}]".format)


# --- fused projected Adam and the moment transform -----------------------------------------------

_LAYER_LISTS = ("params", "grads", "projs", "exp_avgs", "exp_avg_sqs")


def _check_dtype(t, name: str, dtypes) -> None:
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: dtype {dtype_name(t.dtype)} is not supported ({dtype_names(dtypes)})")


def _check_layer(i: int, p, g, q, ma, va, side: str) -> None:
    """Layer ``i``'s tensors: dtypes, devices, shapes and contiguity."""
    for t, nm, dts in zip((p, g, q, ma, va), _LAYER_LISTS, (PERTURB_DTYPES,) * 3 + (MOMENT_DTYPES,) * 2):
        _check_dtype(t, f"{nm}[{i}]", dts)
        if t.device != p.device:
            raise ValueError(f"{nm}[{i}]: on {t.device}, but params[{i}] is on {p.device}")
    if p.dim() == 0:
        raise ValueError(f"params[{i}]: expected at least 1 dimension (viewed as shape[0] x rest)")
    if g.shape != p.shape:
        raise ValueError(f"grads[{i}]: shape {tuple(g.shape)} must equal params[{i}]'s {tuple(p.shape)}")
    m, n = matrix_dims(p)
    rows = m if side == "left" else n
    if q.dim() != 2 or q.shape[0] != rows:
        raise ValueError(
            f"projs[{i}]: expected ({rows}, r) for side {side!r} and params[{i}] viewed as {m} x {n}, "
            f"got {tuple(q.shape)}"
        )
    r = q.shape[1]
    if not 0 < r <= rows:
        raise ValueError(f"projs[{i}]: rank {r} must lie in [1, {rows}] (the projected dimension)")
    mshape = projected_shapes(m, n, r, side)[1]
    for t, nm in ((ma, "exp_avgs"), (va, "exp_avg_sqs")):
        if tuple(t.shape) != mshape:
            raise ValueError(f"{nm}[{i}]: expected shape {mshape} (side {side!r}, rank {r}), got {tuple(t.shape)}")
    for t, nm in ((p, "params"), (g, "grads"), (ma, "exp_avgs"), (va, "exp_avg_sqs")):
        if not t.is_contiguous():
            raise ValueError(f"{nm}[{i}]: must be contiguous")


def _check_same_batch(i: int, layer, first) -> None:
    for t, t0, nm in zip(layer, first, _LAYER_LISTS):
        if t.shape != t0.shape or t.dtype != t0.dtype:
            raise ValueError(f"{nm}[{i}]: shape and dtype must equal {nm}[0]'s (one batch, one shape)")
        if t.device != first[0].device:
            raise ValueError(f"{nm}[{i}]: on {t.device}, but params[0] is on {first[0].device}")


def projected_adam_step_(
    params, grads, projs, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay, scale, side,
    residual_scale, rounding_seed=None, rounding_streams=None, rounding_offsets=None, *, memory=True,
) -> None:  # fmt: skip
    check_choice(side, "side", SIDES)
    k = len(params)
    for xs, nm in zip((grads, projs, exp_avgs, exp_avg_sqs), _LAYER_LISTS[1:]):
        if len(xs) != k:
            raise ValueError(f"{nm}: expected {k} tensors (one per param), got {len(xs)}")
    if len(steps) != k:
        raise ValueError(f"steps: expected {k} ints (one per param), got {len(steps)}")
    if (rounding_seed is None) != (rounding_streams is None):
        raise ValueError("rounding_seed, rounding_streams: give both or neither")
    if rounding_streams is not None:
        check_streams(rounding_streams, k, "rounding_streams")
    if rounding_offsets is not None:
        if rounding_seed is None:
            raise ValueError("rounding_offsets: only with rounding_seed (they index the rounding stream)")
        check_offsets(rounding_offsets, params, "rounding_offsets")
    for s in steps:
        if s < 1:
            raise ValueError(f"steps: each must be >= 1 (the step being taken, counted from 1), got {s}")
    finite_float(lr, "lr", low=0.0)
    finite_float(beta1, "beta1", low=0.0, high=1.0)
    finite_float(beta2, "beta2", low=0.0, high=1.0)
    finite_float(eps, "eps", low=0.0)
    finite_float(weight_decay, "weight_decay", low=0.0)
    finite_float(scale, "scale")
    finite_float(residual_scale, "residual_scale")
    lists = (params, grads, projs, exp_avgs, exp_avg_sqs)
    first = tuple(xs[0] for xs in lists) if k else ()
    for i, layer in enumerate(zip(*lists)):
        _check_layer(i, *layer, side)
        if i:
            _check_same_batch(i, layer, first)
    if memory:
        written = (params, grads, exp_avgs, exp_avg_sqs)  # Q is only read: it may be shared
        names = ("params", "grads", "exp_avgs", "exp_avg_sqs")
        check_disjoint([t for xs in written for t in xs], lambda i: f"{names[i // k]}[{i % k}]")
    check_no_grad(params, "params")


def moment_transform_(exp_avgs, exp_avg_sqs, proj_olds, proj_news, side, transform, *, memory=True) -> None:
    check_choice(side, "side", SIDES)
    check_choice(transform, "mode", MODES)
    k = len(exp_avgs)
    names = ("exp_avgs", "exp_avg_sqs", "proj_olds", "proj_news")
    for xs, nm in zip((exp_avg_sqs, proj_olds, proj_news), names[1:]):
        if len(xs) != k:
            raise ValueError(f"{nm}: expected {k} tensors (one per exp_avg), got {len(xs)}")
    device = exp_avgs[0].device if k else None
    for i, (ma, va, qo, qn) in enumerate(zip(exp_avgs, exp_avg_sqs, proj_olds, proj_news)):
        for t, nm, dts in zip((ma, va, qo, qn), names, (MOMENT_DTYPES,) * 2 + (PERTURB_DTYPES,) * 2):
            _check_dtype(t, f"{nm}[{i}]", dts)
            if t.device != device:
                raise ValueError(f"{nm}[{i}]: on {t.device}, but exp_avgs[0] is on {device}")
        if qo.dim() != 2:
            raise ValueError(f"proj_olds[{i}]: expected a 2-D basis (d, r), got {tuple(qo.shape)}")
        if qn.shape != qo.shape:
            raise ValueError(f"proj_news[{i}]: shape {tuple(qn.shape)} must equal proj_olds[{i}]'s {tuple(qo.shape)}")
        d, r = qo.shape
        if not 0 < r <= d:
            raise ValueError(f"proj_olds[{i}]: rank {r} must lie in [1, {d}]")
        if ma.dim() != 2 or ma.shape[0 if side == "left" else 1] != r:
            want = f"({r}, n)" if side == "left" else f"(m, {r})"
            raise ValueError(f"exp_avgs[{i}]: expected {want} for side {side!r}, got {tuple(ma.shape)}")
        if va.shape != ma.shape:
            raise ValueError(f"exp_avg_sqs[{i}]: shape {tuple(va.shape)} must equal exp_avgs[{i}]'s {tuple(ma.shape)}")
    if memory:
        check_disjoint([*exp_avgs, *exp_avg_sqs], lambda i: f"{names[i // k]}[{i % k}]")


# --- batched randomized SVD ----------------------------------------------------------------------


def _check_batch(A, streams) -> tuple[int, int, int]:
    if A.dim() != 3:
        raise ValueError(f"A: expected a batch (B, m, n), got shape {tuple(A.shape)}")
    _check_dtype(A, "A", PERTURB_DTYPES)
    check_streams(streams, A.shape[0])
    return A.shape[0], A.shape[1], A.shape[2]


def rsvd_sketch(A, k, seed, streams, *, memory=True) -> None:
    _check_batch(A, streams)
    if k < 1:
        raise ValueError(f"k: the sketch width must be >= 1, got {k}")


def _all_finite(A: torch.Tensor) -> None:
    """NaN or Inf anywhere in member b is an error naming ``A[b]``.

    A NaN or Inf makes the float32 sum of its member non-finite; the sum is one vectorised pass,
    about 20x cheaper than ``isfinite().all()`` on the CPU. Only where a sum overflows is the
    exact test needed.
    """
    if A.numel() == 0:
        return
    ok = torch.isfinite(A.sum(dim=(1, 2), dtype=torch.float32))
    if bool(ok.all()):
        return
    exact = torch.isfinite(A).flatten(1).all(1)
    if bool(exact.all()):
        return
    b = int((~exact).nonzero()[0])
    raise NonFiniteError(f"A[{b}]: contains NaN or Inf (a basis of a non-finite matrix means nothing)", b)


def randomized_range(A, rank, oversample, power_iters, seed, streams, *, memory=True) -> None:
    _, m, n = _check_batch(A, streams)
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank: must lie in [1, min(m, n) = {min(m, n)}] for a {m} x {n} matrix, got {rank}")
    if oversample < 0:
        raise ValueError(f"oversample: must be >= 0, got {oversample}")
    if power_iters < 0:
        raise ValueError(f"power_iters: must be >= 0, got {power_iters}")
    if memory:
        _all_finite(A)


randomized_svd = randomized_range  # same arguments, same rules


# --- the seeded linear layer ---------------------------------------------------------------------


def seeded_linear(x, weight, bias, seed, weight_stream, bias_stream, alpha, *, memory=True) -> None:
    # No data-dependent checks (memory): the output is a new tensor, nothing is written in place,
    # and NaN or Inf in the inputs propagates as in F.linear.
    for t, nm in ((x, "x"), (weight, "weight"), (bias, "bias")):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{nm}: expected a tensor, got {type(t).__name__}")
    _check_dtype(weight, "weight", PERTURB_DTYPES)
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (out_features, in_features) matrix, got shape {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    for t, nm in ((x, "x"), (bias, "bias")):
        if t is None:
            continue
        if t.dtype != weight.dtype:
            raise TypeError(f"{nm}: dtype {dtype_name(t.dtype)} must equal weight's {dtype_name(weight.dtype)}")
        if t.device != weight.device:
            raise ValueError(f"{nm}: on {t.device}, but weight is on {weight.device}")
    if x.dim() < 1 or x.shape[-1] != in_f:
        raise ValueError(f"x: expected shape (..., {in_f}) (weight's in_features last), got {tuple(x.shape)}")
    check_stream(weight_stream, "weight_stream")
    if bias is not None:
        if tuple(bias.shape) != (out_f,):
            raise ValueError(f"bias: expected shape ({out_f},) (weight's out_features), got {tuple(bias.shape)}")
        check_stream(bias_stream, "bias_stream")
    finite_float(alpha, "alpha")
    if torch.is_grad_enabled():
        for t, nm in ((x, "x"), (weight, "weight"), (bias, "bias")):
            if t is not None and t.requires_grad:
                raise RuntimeError(
                    f"{nm}: requires grad, but seeded_linear has no autograd (it evaluates zeroth-order "
                    "probes); call it under torch.no_grad()"
                )
