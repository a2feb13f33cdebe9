"""Reference seeded linear layer (docs/kernels.md section 4): the meaning every backend is tested against.

``seeded_linear(x, weight, bias, seed, weight_stream, bias_stream, alpha)`` is ``F.linear(x, W', b')``
with the perturbed parameters

    W' = round(float32(weight) + alpha z_W),  z_W[i] = z(seed, weight_stream, i)   (docs/rng.md)
    b' = round(float32(bias) + alpha z_b),    z_b[i] = z(seed, bias_stream, i)

over the flat row-major index ``i`` of each, rounded once to the parameters' dtype: exactly what
``seeded_axpby_`` (alpha, beta = 1) writes into a copy. The reference makes that copy and calls the
op (so the device's fastest ``seeded_axpby_`` runs), then ``F.linear``: one weight-sized temporary
and one extra read and write of the weight, which the fused kernels avoid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ops
from .._registry import register


@register("seeded_linear", "reference", "any")
def seeded_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    seed: int,
    weight_stream: int,
    bias_stream: int,
    alpha: float,
) -> torch.Tensor:
    # contiguous copies: the noise follows the logical row-major index, whatever weight's strides
    w = weight.clone(memory_format=torch.contiguous_format)
    params, streams = [w], [weight_stream]
    b = None
    if bias is not None:
        b = bias.clone(memory_format=torch.contiguous_format)
        params.append(b)
        streams.append(bias_stream)
    _ops.seeded_axpby_(params, seed, streams, [alpha] * len(params), [1.0] * len(params), None, None)
    return F.linear(x, w, b)
