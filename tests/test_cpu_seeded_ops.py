"""CPU-kernel specifics of the seeded ops (csrc/cpu/seeded_ops.cpp): every instruction set the
machine supports, chunk and tile boundaries, dtype conversions bit for bit, thread-count
independence, accuracy against a float64 evaluation of the stream. The backend-generic tests live
in test_seeded_ops.py and test_rng.py. Inputs are fresh random draws on every run; failures print
the seed and stream.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import AXPBY_TOL

import lorenza_kernels as lk
from lorenza_kernels import _ext
from lorenza_kernels._dtypes import CODES
from lorenza_kernels._shapes import matrix_dims
from lorenza_kernels.reference import seeded_ops as ref
from lorenza_kernels.reference.rng import gaussian_flat, stochastic_round_range

if not _ext.has_cpu_kernels():
    pytest.skip(f"CPU kernels not built ({_ext.error})", allow_module_level=True)

_C = _ext._C
CHUNK = 1 << 16  # elements per parallel task in the kernel
ISAS = ["avx512", "avx2", "sse2", "scalar"]
# odd sizes, sizes around 4 (a Philox block), 64 (a tile) and CHUNK (a task)
SHAPES = [(0,), (1,), (3,), (5,), (63,), (65,), (5, 123, 123), (CHUNK - 1,), (CHUNK + 3,), (2, CHUNK + 5), (7, 0)]
DTYPES = list(AXPBY_TOL)


def _id(x) -> str:
    if isinstance(x, torch.dtype):
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[x]
    return "x".join(map(str, x)) if isinstance(x, tuple) else str(x)


@pytest.fixture(params=ISAS)
def isa(request):
    if request.param not in _C.cpu_isas():
        pytest.skip(f"{request.param} not supported on this CPU ({_C.cpu_isas()})")
    _C.set_cpu_isa(request.param)
    yield request.param
    _C.set_cpu_isa("auto")


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


def _seed() -> int:
    return random.getrandbits(64)


def _stream(count: int = 1) -> int:
    return random.randrange(1 << 16, (1 << 32) - count)


def _run(backend: str, tensors, seed, alpha, beta, stream, rows=None, gamma=None):
    with lk.use_backend(backend):
        return lk.seeded_axpby_(tensors, seed, alpha, beta, first_stream=stream, row_vectors=rows, gamma=gamma)


def _exact(t0, seed, stream, alpha, beta, row=None, gamma=0.0):
    """float64 evaluation of beta t + alpha z + gamma 1 a^T, z the float64 stream."""
    z = gaussian_flat(t0.numel(), seed, stream, compute_dtype=torch.float64).view(t0.shape)
    out = alpha * z + (beta * t0.double() if beta != 0 else 0.0)
    if row is not None:
        out = out + gamma * row.double().repeat(t0.numel() // max(row.numel(), 1))[: t0.numel()].view(t0.shape)
    return out


@pytest.mark.parametrize("beta", [1.0, 0.0, -0.75], ids=lambda b: f"beta={b:g}")
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_axpby_matches_reference(shape, dtype, beta):
    seed, stream, alpha = _seed(), _stream(), random.uniform(0.5, 2.0)
    t0 = torch.randn(shape).to(dtype)
    ours, theirs = t0.clone(), t0.clone()
    if beta == 0.0:
        ours.fill_(float("nan"))  # beta == 0 must not read the tensor
    n_ours = _run("cpu", [ours], seed, alpha, beta, stream)
    n_ref = _run("reference", [theirs], seed, alpha, beta, stream)
    atol, rtol = AXPBY_TOL[dtype]
    msg = f"seed={seed} stream={stream}"
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=rtol, msg=msg)
    torch.testing.assert_close(n_ours, n_ref, atol=1e-6, rtol=1e-5, msg=msg)
    if dtype != torch.float32 and t0.numel():  # flash-attention's rule: at most twice the reference's error
        exact = _exact(t0, seed, stream, alpha, beta)
        err, err_ref = (ours.double() - exact).abs().max(), (theirs.double() - exact).abs().max()
        assert err <= 2 * err_ref + 1e-6, f"{msg}: error {err} vs reference {err_ref}"


def test_mixed_dtypes_and_streams():
    shapes_dtypes = [
        ((5, 123, 123), torch.float32),
        ((3,), torch.bfloat16),
        ((1000, 7), torch.float16),
        ((0,), torch.float32),
        ((CHUNK + 1,), torch.bfloat16),
        ((33, 65), torch.float32),
    ]
    ts = [torch.randn(s).to(d) for s, d in shapes_dtypes]
    seed, stream = _seed(), _stream(len(ts))
    alpha = [random.uniform(-2, 2) for _ in ts]
    beta = [random.choice([0.0, 1.0, random.uniform(-1, 1)]) for _ in ts]
    ours, theirs = [t.clone() for t in ts], [t.clone() for t in ts]
    for t, b in zip(ours, beta):
        if b == 0.0:
            t.fill_(float("nan"))
    n_ours, n_ref = _run("cpu", ours, seed, alpha, beta, stream), _run("reference", theirs, seed, alpha, beta, stream)
    for k, (a, b) in enumerate(zip(ours, theirs)):
        atol, rtol = AXPBY_TOL[a.dtype]
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"tensor {k}, seed={seed} stream={stream}")
    torch.testing.assert_close(n_ours, n_ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(1000,), (5, 123, 123), (64, 96), (3, CHUNK + 7), (40, 3001)], ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_rank_one_term(shape, dtype):
    seed, stream = _seed(), _stream(2)
    ts = [torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)]
    n = matrix_dims(ts[0])[1]
    rows = [torch.randn(n), torch.full((n,), float("nan"))]  # gamma 0 must leave the NaN row out
    alpha, beta, gamma = [0.7, -1.3], [1.0, 0.0], [random.uniform(-2, 2), 0.0]
    ours, theirs = [t.clone() for t in ts], [t.clone() for t in ts]
    ours[1].fill_(float("nan"))
    _run("cpu", ours, seed, alpha, beta, stream, rows, gamma)
    _run("reference", theirs, seed, alpha, beta, stream, rows, gamma)
    atol, rtol = AXPBY_TOL[dtype]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=f"seed={seed} stream={stream}")
    exact = _exact(ts[0], seed, stream, alpha[0], beta[0], rows[0], gamma[0])
    err, err_ref = (ours[0].double() - exact).abs().max(), (theirs[0].double() - exact).abs().max()
    assert err <= 2 * err_ref + 1e-5, f"error {err} vs reference {err_ref}"


@pytest.mark.parametrize(
    "shape", [(1,), (3,), (5, 123, 123), (4096, 3), (CHUNK + 9,), (2, 70001), (300, 257), (0, 5), (1000, 64)], ids=_id
)
def test_colsum(shape):
    seed, stream = _seed(), _stream()
    t = torch.empty(shape, dtype=torch.bfloat16)
    with lk.use_backend("cpu"):
        (ours,) = lk.seeded_colsum([t], seed, first_stream=stream)
    (theirs,) = ref.seeded_colsum([t], seed, [stream])
    m, n = matrix_dims(t)
    assert ours.shape == (n,) and ours.dtype == torch.float32
    exact = gaussian_flat(m * n, seed, stream, compute_dtype=torch.float64).view(m, n).sum(0)
    bound = 1e-6 * m + 1e-6  # each of the m terms within 1e-6 of float64, plus the final rounding
    msg = f"seed={seed} stream={stream}"
    torch.testing.assert_close(ours.double(), exact, atol=bound, rtol=1e-6, msg=msg)
    torch.testing.assert_close(ours, theirs, atol=2 * bound, rtol=1e-5, msg=msg)


def _mixed_inputs():
    shapes = [(3 * CHUNK + 5,), (5, 123, 123), (7,), (129, 1000), (CHUNK,), (3, 21845)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16] * 2
    ts = [torch.randn(s).to(d) for s, d in zip(shapes, dtypes)]
    return ts, [torch.randn(matrix_dims(t)[1]) for t in ts], _seed(), _stream(len(ts))


def _round_at(dst, src, offsets, seed, streams):
    """The CPU kernel of stochastic_round_ with element offsets (what the CPU projected Adam uses)."""
    _C.stochastic_round_cpu([d.data_ptr() for d in dst], [s.data_ptr() for s in src], [d.numel() for d in dst],
                            [CODES[d.dtype] for d in dst], offsets, seed, streams, torch.get_num_threads())  # fmt: skip


def _all_ops(ts, rows, seed, stream):
    """Every op on a mixed list: axpby with beta 0 (poisoned) and 0.5, the rank-1 term, with and
    without stochastic rounding; colsums; stochastic_round_, also at element offsets inside a tile."""
    out0 = [torch.full_like(t, float("nan")) for t in ts]
    out1 = [t.clone() for t in ts]
    out2 = [t.clone() for t in ts]
    n0 = _run("cpu", out0, seed, -1.1, 0.0, stream)
    n1 = _run("cpu", out1, seed, 0.9, 0.5, stream, rows, 0.3)
    with lk.use_backend("cpu"):
        n2 = lk.seeded_axpby_(out2, seed, 1e-3, 1.0, first_stream=stream, rounding_seed=seed ^ 0x5DEECE66D)
        cols = lk.seeded_colsum(ts, seed, first_stream=stream)
        src = [t.float() * 1.001 for t in ts]
        out3 = [torch.full_like(t, float("nan")) for t in ts]
        lk.stochastic_round_(out3, src, seed, first_stream=stream)
    out4 = [torch.full_like(t, float("nan")) for t in ts]
    _round_at(out4, src, [1, 63, 5, 4 * CHUNK - 3, 0, 2][: len(ts)], seed, list(range(len(ts))))
    return out0 + out1 + out2 + out3 + out4 + [n0, n1, n2] + cols


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_isas_agree_bitwise(isa):
    """Each instruction set gives the default one's bits (the kernels are compiled without FMA
    contraction), so the reference tests, which run with the default, cover them all."""
    ts, rows, seed, stream = _mixed_inputs()
    ours = _all_ops(ts, rows, seed, stream)
    _C.set_cpu_isa("auto")
    best = _all_ops(ts, rows, seed, stream)
    for k, (a, b) in enumerate(zip(ours, best)):
        assert _same_bits(a, b), f"{isa}: output {k} differs from {_C.cpu_isa()}, seed={seed} stream={stream}"


def test_thread_count_independence(threads):
    ts, rows, seed, stream = _mixed_inputs()
    results = []
    for nt in (1, 2, 3):
        torch.set_num_threads(nt)
        results.append(_all_ops(ts, rows, seed, stream))
    for nt, res in zip((2, 3), results[1:]):
        for k, (a, b) in enumerate(zip(res, results[0])):
            assert _same_bits(a, b), f"{nt} threads: output {k} differs from 1 thread, seed={seed} stream={stream}"


@pytest.mark.parametrize("n", [100_003, 4 * CHUNK + 1])
def test_accuracy_against_float64(isa, n):
    for _ in range(2):
        seed, stream = random.randrange(1 << 32, 1 << 64), _stream()
        with lk.use_backend("cpu"):
            z = lk.gaussian(n, seed, stream)
        exact = gaussian_flat(n, seed, stream, compute_dtype=torch.float64)
        err = (z.double() - exact).abs().max().item()
        assert err <= 1e-5, f"seed={seed} stream={stream}: max error {err}"
    # the extremes of the key and counter words
    for seed, stream in [((1 << 64) - 1, (1 << 32) - 1), (1 << 63, 1 << 31)]:
        with lk.use_backend("cpu"):
            z = lk.gaussian(1001, seed, stream)
        assert (z.double() - gaussian_flat(1001, seed, stream, compute_dtype=torch.float64)).abs().max() <= 1e-5


KNOWN = {  # docs/rng.md, float64 evaluation rounded to 7 decimals
    (0, 0): [0.9911375, -0.9246628, -0.6176091, -0.4820683, -0.1536382, 0.1808258, 0.8317351, 0.1974396],
    (1099511627783, 3): [-0.2224926, -0.3849995, -1.0488936, 0.5205431, -1.4329347, 0.6782839, 0.1174121, -1.0960013],
}


def test_known_answers(isa):
    for (seed, stream), want in KNOWN.items():
        with lk.use_backend("cpu"):
            z = lk.gaussian(8, seed, stream)
        torch.testing.assert_close(z.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
@pytest.mark.parametrize("beta", [1.0, 0.3, 3.7], ids=lambda b: f"beta={b:g}")
def test_conversions_bit_exact(isa, dtype, beta):
    """Every 16-bit pattern (normals, subnormals, Inf, NaN) read, scaled and rounded back like torch."""
    t = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    ours = t.clone()
    _run("cpu", [ours], _seed(), 0.0, beta, _stream())  # alpha = 0: v = t beta + (+-0)
    want = (t.float() * beta).to(dtype)
    torch.testing.assert_close(ours, want, atol=0, rtol=0, equal_nan=True)


def test_binding_rejects_bad_arguments():
    t = torch.zeros(8)
    norms = torch.zeros(1)
    args = dict(
        ptrs=[t.data_ptr()],
        numels=[8],
        dtypes=[0],
        ncols=[8],
        seed=0,
        streams=[0],
        alpha=[1.0],
        beta=[0.0],
        row_ptrs=[0],
        gamma=[0.0],
        norms_ptr=norms.data_ptr(),
        num_threads=1,
    )
    bad_args = (dict(alpha=[]), dict(dtypes=[7]), dict(ncols=[3]), dict(streams=[1 << 32]), dict(streams=[]),
                dict(ptrs=[0]))  # fmt: skip
    for bad in bad_args:
        with pytest.raises(ValueError):
            _C.seeded_axpby_cpu(**{**args, **bad})
    with pytest.raises(ValueError):
        _C.set_cpu_isa("no-such-isa")


def test_direct_op_call_is_checked():
    """torch.ops bypasses the public functions; the op's validator still refuses what would read out of bounds."""
    with lk.use_backend("cpu"):
        with pytest.raises((ValueError, RuntimeError), match="row_vectors"):
            torch.ops.lorenza_kernels.seeded_axpby_([torch.zeros(4, 5)], 0, [0], [1.0], [1.0], [torch.zeros(3)], [1.0])
        with pytest.raises((ValueError, RuntimeError), match="contiguous"):
            torch.ops.lorenza_kernels.seeded_axpby_([torch.zeros(5, 4).t()], 0, [0], [1.0], [1.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
def test_stochastic_round_offsets(isa, dtype):
    """Element i of a part that starts at element ``offset`` of a larger tensor draws the rounding
    word of index offset + i: rounding the parts (any offsets, inside a Philox block or a tile,
    across the kernel's chunks) gives the bits of rounding the whole (the reference's)."""
    n = 3 * CHUNK + 77
    src = torch.randn(n) * 10.0 ** random.uniform(-3, 3)
    seed, stream = _seed(), _stream()
    want = stochastic_round_range(src, 0, seed, stream, dtype)
    whole = torch.full((n,), float("nan"), dtype=dtype)
    _round_at([whole], [src], [0], seed, [stream])
    assert torch.equal(whole.view(torch.int16), want.view(torch.int16)), f"seed={seed} stream={stream}"
    cuts = {0, n, 1, 2, 3, 5, 63, 64, 65, 130, CHUNK - 1, CHUNK + 2, 2 * CHUNK + 61}
    cuts = sorted(cuts | set(random.sample(range(n), 8)))
    parts = torch.full((n,), float("nan"), dtype=dtype)
    pieces = list(zip(cuts, cuts[1:]))
    _round_at([parts[a:b] for a, b in pieces], [src[a:b] for a, b in pieces], [a for a, _ in pieces], seed,
              [stream] * len(pieces))  # fmt: skip
    assert torch.equal(parts.view(torch.int16), want.view(torch.int16)), f"seed={seed} stream={stream} cuts={cuts}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=_id)
def test_axpby_rounding_matches_reference_across_chunks(isa, dtype):
    """seeded_axpby_ with a rounding seed over tensors longer than a chunk (several OpenMP tasks),
    every ISA: the reference's rounding of the kernel's own float32 value, bit for bit."""
    t0 = torch.randn(2, CHUNK + 5).to(dtype)
    seed, rseed, stream = _seed(), _seed(), _stream()
    ours, v = t0.clone(), t0.to(torch.float32, copy=True)
    with lk.use_backend("cpu"):
        lk.seeded_axpby_([ours], seed, 3e-3, 1.0, first_stream=stream, rounding_seed=rseed)
        lk.seeded_axpby_([v], seed, 3e-3, 1.0, first_stream=stream)
    want = stochastic_round_range(v, 0, rseed, stream, dtype).view(t0.shape)
    assert torch.equal(ours.view(torch.int16), want.view(torch.int16)), f"seed={seed} rseed={rseed}"
    plain = t0.clone()
    with lk.use_backend("cpu"):
        lk.seeded_axpby_([plain], seed, 3e-3, 1.0, first_stream=stream)
    assert not torch.equal(ours, plain)  # (with overwhelming probability) the rounding differs somewhere


def test_stochastic_round_binding_rejects_bad_arguments():
    d, s = torch.empty(8, dtype=torch.bfloat16), torch.zeros(8)
    args = dict(dst_ptrs=[d.data_ptr()], src_ptrs=[s.data_ptr()], numels=[8], dtypes=[1], offsets=[0], seed=0,
                streams=[0], num_threads=1)  # fmt: skip
    for bad in (dict(dtypes=[7]), dict(offsets=[-1]), dict(numels=[-1]), dict(streams=[1 << 32]), dict(src_ptrs=[0]),
                dict(offsets=[]), dict(streams=[])):  # fmt: skip
        with pytest.raises(ValueError):
            _C.stochastic_round_cpu(**{**args, **bad})
    _C.stochastic_round_cpu(**args)
