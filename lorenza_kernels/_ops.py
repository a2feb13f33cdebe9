"""The ``lorenza_kernels`` torch.library namespace: every schema, declared once, with its fake.

Each op is defined here with ``torch.library.Library`` and dispatched by torch's own dispatcher:
the pure-PyTorch reference is the kernel of every device (``CompositeExplicitAutograd``), and
``_registry.install`` registers the faster backends for the ``CPU`` and ``CUDA`` keys. Every kernel
(and the fake) is wrapped by :func:`kernel`, which runs the op's validator (``_validate.py``) first
and bumps the version counters of the tensors the op mutates, as torch's own in-place ops do.
The fakes allocate outputs from shapes alone, so the ops run on the meta device, under
``FakeTensorMode`` and inside ``torch.compile`` graphs.

Seeds travel as int64: the public API maps a seed in [0, 2^64) to its two's-complement int64, and
the kernels read the same 64 bits back as an unsigned key. The attributes ``seeded_axpby_`` ...
of this module are the ops' ``OpOverload`` objects, the fastest way to call them from Python.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import _validate

NAMESPACE = "lorenza_kernels"

#: name -> (schema, positions of the mutated tensor-list arguments)
SCHEMAS: dict[str, tuple[str, tuple[int, ...]]] = {
    # docs/kernels.md section 1: seeded perturbation regeneration
    "seeded_axpby_": (
        "(Tensor(a!)[] tensors, int seed, int[] streams, float[] alpha, float[] beta, "
        "Tensor[]? row_vectors=None, float[]? gamma=None, int? rounding_seed=None, int[]? offsets=None) -> Tensor",
        (0,),
    ),
    "seeded_colsum": ("(Tensor[] tensors, int seed, int[] streams, int[]? offsets=None) -> Tensor[]", ()),
    # dst_k <- SR(src_k) with the rounding stream (seed, streams[k]) (docs/rng.md)
    "stochastic_round_": (
        "(Tensor(a!)[] dst, Tensor[] src, int seed, int[] streams, int[]? offsets=None) -> ()",
        (0,),
    ),
    # docs/kernels.md section 2: fused projected Adam and the moment transform
    "projected_adam_step_": (
        "(Tensor(a!)[] params, Tensor[] grads, Tensor[] projs, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
        "int[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, float scale, str side, "
        "float residual_scale, int? rounding_seed=None, int[]? rounding_streams=None, "
        "int[]? rounding_offsets=None) -> ()",
        (0, 3, 4),
    ),
    "moment_transform_": (
        # not "mode": torch's dispatch-mode machinery takes that name
        "(Tensor(a!)[] exp_avgs, Tensor(b!)[] exp_avg_sqs, Tensor[] proj_olds, Tensor[] proj_news, str side, "
        "str transform) -> ()",
        (0, 1),
    ),
    # docs/kernels.md section 3: batched randomized SVD. A is a batch (B, m, n); member b draws its
    # sketch from stream streams[b]; outputs are float32.
    "rsvd_sketch": ("(Tensor A, int k, int seed, int[] streams) -> Tensor", ()),
    "randomized_range": (
        "(Tensor A, int rank, int oversample, int power_iters, int seed, int[] streams) -> Tensor",
        (),
    ),
    "randomized_svd": (
        "(Tensor A, int rank, int oversample, int power_iters, int seed, int[] streams) -> (Tensor, Tensor, Tensor)",
        (),
    ),
    # docs/kernels.md section 4: a linear layer whose weight (and bias) carry seeded noise, generated
    # inside the GEMM. bias_stream is ignored when bias is None.
    "seeded_linear": (
        "(Tensor x, Tensor weight, Tensor? bias, int seed, int weight_stream, int bias_stream, float alpha) -> Tensor",
        (),
    ),
}

LIB = torch.library.Library(NAMESPACE, "DEF")
for _name, (_schema, _) in SCHEMAS.items():
    LIB.define(_name + _schema)


def kernel(name: str, fn: Callable) -> Callable:
    """``fn`` behind op ``name``'s validator; mutated tensors get their version counters bumped."""
    validate = getattr(_validate, name)
    mutated = SCHEMAS[name][1]
    bump = torch.autograd.graph.increment_version
    if not mutated:

        def run(*args, **kwargs):
            validate(*args, **kwargs)
            return fn(*args, **kwargs)

    else:

        def run(*args, **kwargs):
            validate(*args, **kwargs)
            out = fn(*args, **kwargs)
            for i in mutated:
                bump(args[i])
            return out

    run.__name__ = run.__qualname__ = f"{name}[{getattr(fn, '__module__', '?')}]"
    run.__wrapped__ = fn  # type: ignore[attr-defined]
    return run


# --- fakes: shapes only, after the validator's shape and dtype checks ----------------------------


def _device(tensors) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def _fake_seeded_axpby_(
    tensors, seed, streams, alpha, beta, row_vectors=None, gamma=None, rounding_seed=None, offsets=None
):
    return torch.empty(len(tensors), dtype=torch.float32, device=_device(tensors))


def _fake_seeded_colsum(tensors, seed, streams, offsets=None):
    from ._shapes import matrix_dims

    return [torch.empty(matrix_dims(t)[1], dtype=torch.float32, device=t.device) for t in tensors]


def _fake_nothing(*args, **kwargs):
    return None


def _fake_rsvd_sketch(A, k, seed, streams):
    return A.new_empty((A.shape[0], A.shape[1], k), dtype=torch.float32)


def _fake_randomized_range(A, rank, oversample, power_iters, seed, streams):
    return A.new_empty((A.shape[0], A.shape[2], rank), dtype=torch.float32)


def _fake_randomized_svd(A, rank, oversample, power_iters, seed, streams):
    nb, m, n = A.shape
    f32 = torch.float32
    return (
        A.new_empty((nb, m, rank), dtype=f32),
        A.new_empty((nb, rank), dtype=f32),
        A.new_empty((nb, rank, n), dtype=f32),
    )


def _fake_seeded_linear(x, weight, bias, seed, weight_stream, bias_stream, alpha):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype)


_FAKES = {
    "seeded_axpby_": _fake_seeded_axpby_,
    "seeded_colsum": _fake_seeded_colsum,
    "stochastic_round_": _fake_nothing,
    "projected_adam_step_": _fake_nothing,
    "moment_transform_": _fake_nothing,
    "rsvd_sketch": _fake_rsvd_sketch,
    "randomized_range": _fake_randomized_range,
    "randomized_svd": _fake_randomized_svd,
    "seeded_linear": _fake_seeded_linear,
}


def _fake(name: str) -> Callable:
    validate, fake = getattr(_validate, name), _FAKES[name]

    def run(*args, **kwargs):
        validate(*args, **kwargs, memory=False)
        return fake(*args, **kwargs)

    return run


for _name in SCHEMAS:
    torch.library.register_fake(f"{NAMESPACE}::{_name}", _fake(_name), lib=LIB)
    LIB.impl(_name, _fake(_name), "Meta")  # before the reference's CompositeExplicitAutograd kernel

# The OpOverloads, for the public API (``torch.ops`` resolves a packet and an overload per access).
seeded_axpby_ = torch.ops.lorenza_kernels.seeded_axpby_.default
seeded_colsum = torch.ops.lorenza_kernels.seeded_colsum.default
stochastic_round_ = torch.ops.lorenza_kernels.stochastic_round_.default
projected_adam_step_ = torch.ops.lorenza_kernels.projected_adam_step_.default
moment_transform_ = torch.ops.lorenza_kernels.moment_transform_.default
rsvd_sketch = torch.ops.lorenza_kernels.rsvd_sketch.default
randomized_range = torch.ops.lorenza_kernels.randomized_range.default
randomized_svd = torch.ops.lorenza_kernels.randomized_svd.default
seeded_linear = torch.ops.lorenza_kernels.seeded_linear.default
