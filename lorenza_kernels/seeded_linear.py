"""Public seeded linear layer (``docs/kernels.md`` section 4): ``F.linear`` with a seeded-noise
perturbation of its weight and bias, evaluated without writing or copying the parameters.

The function only puts the arguments in the op's form (a seed in [0, 2^64) to its int64 encoding,
integral streams to ints, the bias stream required with a bias) and calls
``torch.ops.lorenza_kernels.seeded_linear``; the op's validator checks everything else, the same for
every caller.
"""

from __future__ import annotations

import torch

from . import _checks, _ops


def seeded_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    seed: int,
    alpha: float,
    weight_stream: int,
    bias_stream: int | None = None,
) -> torch.Tensor:
    """``F.linear(x, W', b')`` with the parameters perturbed by seeded noise, never materialised.

    With ``z(seed, s, i)`` the Gaussian stream of ``docs/rng.md`` and ``i`` the flat row-major index
    (``weight`` is ``(out, in)``)::

        W'[i] = round(float32(weight[i]) + alpha * z(seed, weight_stream, i))
        b'[i] = round(float32(bias[i])   + alpha * z(seed, bias_stream, i))     (when bias is given)
        y     = x W'^T + b'      (float32 accumulation, rounded once to weight's dtype)

    ``round`` is one rounding to the parameters' dtype (round to nearest even): ``W'`` is exactly the
    tensor ``seeded_axpby_([weight.clone()], seed, alpha, 1.0, streams=[weight_stream])`` would
    write, i.e. the parameter a zeroth-order optimizer perturbs in place (``theta + mu z``), here
    evaluated without touching ``weight``. On CUDA the noise is generated inside the GEMM (Triton):
    no weight-sized temporary and no extra pass over the weight. Contract, precision and limits:
    ``docs/kernels.md`` section 4.

    - ``x``: ``(..., in)``, same dtype (float32, bfloat16, float16) and device as ``weight``; any
      strides. The result is ``(..., out)`` in that dtype.
    - ``bias``: ``(out,)`` or None; ``bias_stream`` is then **required** (a stream of its own: the
      weight's stream plus one may be another parameter's stream in the caller's numbering).
    - ``seed`` in [0, 2^64), streams in [0, 2^32), ``alpha`` finite.
    - No autograd: it serves probes; with grad mode on, an input that requires grad is an error.
    """
    seed64 = seed if type(seed) is int and 0 <= seed < (1 << 63) else _checks.seed_to_int64(seed)
    ws = _checks.as_int(weight_stream, "weight_stream")
    if bias is None:
        bs = 0  # ignored by the op
    elif bias_stream is None:
        raise ValueError(
            "bias_stream: required when bias is given (the stream of the bias's noise; no default, "
            "so that it cannot collide with another parameter's stream)"
        )
    else:
        bs = _checks.as_int(bias_stream, "bias_stream")
    a = _checks.finite_float(alpha, "alpha")
    return _ops.seeded_linear(x, weight, bias, seed64, ws, bs, a)
