"""seeded_axpby_ / seeded_colsum / seeded_loren_stats: every backend against the reference."""

from __future__ import annotations

import pytest
import torch
from conftest import AXPBY_TOL, BACKENDS, dtype_id, poison_, require_backend

import lorenza_kernels as lk
from lorenza_kernels import _registry
from lorenza_kernels._shapes import matrix_dims
from lorenza_kernels.reference.rng import gaussian_flat

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (0,), (1,), (3,), (5,), (4, 0), (7, 13), (5, 123, 123), (3, 2, 5, 7)]


def _rand(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()).item()))  # fresh inputs every run


def _run(backend, fn, *args, **kwargs):
    with lk.use_backend(backend):
        return fn(*args, **kwargs)


def _f64_expected(t0, seed, stream, alpha, beta, row=None, gamma=None):
    z = gaussian_flat(t0.numel(), seed, stream, compute_dtype=torch.float64).reshape(t0.shape)
    out = beta * t0.double().cpu() + alpha * z if beta != 0 else alpha * z
    if row is not None:
        n = matrix_dims(t0)[1]
        out = out + gamma * row.double().cpu().repeat(max(1, t0.numel() // max(n, 1)))[: t0.numel()].reshape(t0.shape)
    return out


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_axpby_matches_reference(backend, dev, dtype, shape):
    require_backend("seeded_axpby_", backend, dev)
    gen = _gen()
    t0 = _rand(shape, dtype, dev, gen)
    t, t_ref = t0.clone(), t0.clone()
    seed, stream = (
        int(torch.randint(0, 2**62, (), generator=gen)) * 3,
        1000 + int(torch.randint(0, 99, (), generator=gen)),
    )
    with lk.use_backend(backend):
        assert _registry.active("seeded_axpby_", dev) == backend
        norms = lk.seeded_axpby_([t], seed, 0.37, 0.9, first_stream=stream)
    ref_norms = _run("reference", lk.seeded_axpby_, [t_ref], seed, 0.37, 0.9, first_stream=stream)
    atol, rtol = AXPBY_TOL[dtype]
    torch.testing.assert_close(t.cpu(), t_ref.cpu(), atol=atol, rtol=rtol)
    torch.testing.assert_close(norms.cpu(), ref_norms.cpu(), atol=1e-4, rtol=1e-5)
    assert norms.dtype == torch.float32 and norms.device.type == dev
    # Independently of the reference: the float64 evaluation of the definition, rounded once.
    exact = _f64_expected(t0, seed, stream, 0.37, 0.9)
    torch.testing.assert_close(t.double().cpu(), exact.to(dtype).double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_axpby_error_against_float64(backend, dev, dtype):
    require_backend("seeded_axpby_", backend, dev)
    gen = _gen()
    t0 = _rand((37, 129), dtype, dev, gen)
    t, t_ref = t0.clone(), t0.clone()
    _run(backend, lk.seeded_axpby_, [t], 99, -0.5, 1.25, first_stream=3)
    _run("reference", lk.seeded_axpby_, [t_ref], 99, -0.5, 1.25, first_stream=3)
    exact = _f64_expected(t0, 99, 3, -0.5, 1.25)
    err, ref_err = (t.double().cpu() - exact).abs().max(), (t_ref.double().cpu() - exact).abs().max()
    assert err <= 2 * ref_err + 1e-5, f"{backend}: {err:.3g} vs reference {ref_err:.3g}"


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_axpby_beta_zero_overwrites_poison(backend, dev, dtype):
    require_backend("seeded_axpby_", backend, dev)
    t = poison_(torch.empty(5, 37, dtype=dtype, device=dev))
    norms = _run(backend, lk.seeded_axpby_, [t], 123, 2.0, 0.0, first_stream=4)
    assert bool(torch.isfinite(t).all()) and bool(torch.isfinite(norms).all())
    z = gaussian_flat(t.numel(), 123, 4, compute_dtype=torch.float64).reshape(t.shape)
    atol, rtol = AXPBY_TOL[dtype]
    torch.testing.assert_close(t.double().cpu(), (2.0 * z).to(dtype).double(), atol=2 * atol, rtol=rtol)


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_axpby_mixed_list(backend, dev):
    require_backend("seeded_axpby_", backend, dev)
    gen = _gen()
    specs = [
        ((17,), torch.float32),
        ((3, 5), torch.bfloat16),
        ((), torch.float16),
        ((0, 4), torch.float32),
        ((9, 2, 3), torch.float16),
        ((1031,), torch.bfloat16),
        ((64, 33), torch.float32),
    ]
    ts = [_rand(s, d, dev, gen) for s, d in specs]
    refs = [t.clone() for t in ts]
    alpha = [0.1 * (k + 1) for k in range(len(ts))]
    beta = [1.0, 0.5, 0.0, 2.0, -1.0, 0.25, 1.0]
    seed = (1 << 40) + 17
    norms = _run(backend, lk.seeded_axpby_, ts, seed, alpha, beta, first_stream=(1 << 16) + 1)
    ref_norms = _run("reference", lk.seeded_axpby_, refs, seed, alpha, beta, first_stream=(1 << 16) + 1)
    for t, r in zip(ts, refs):
        atol, rtol = AXPBY_TOL[t.dtype]
        torch.testing.assert_close(t.cpu(), r.cpu(), atol=atol, rtol=rtol)
    torch.testing.assert_close(norms.cpu(), ref_norms.cpu(), atol=1e-4, rtol=1e-5)
    for k, (s, _) in enumerate(specs):
        n = 1
        for d in s:
            n *= d
        expected = gaussian_flat(n, seed, (1 << 16) + 1 + k, compute_dtype=torch.float64).square().sum()
        assert abs(norms[k].item() - expected.item()) <= 1e-5 * max(1.0, expected.item()) + 1e-4


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_axpby_plus_then_minus_restores(backend, dev):
    require_backend("seeded_axpby_", backend, dev)
    t0 = _rand((33, 65), torch.float32, dev, _gen())
    t = t0.clone()
    n1 = _run(backend, lk.seeded_axpby_, [t], 5, 1e-3)
    n2 = _run(backend, lk.seeded_axpby_, [t], 5, -1e-3)
    assert torch.equal(n1, n2)
    torch.testing.assert_close(t, t0, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("shape", [(7,), (6, 11), (4, 3, 5)], ids=str)
def test_axpby_rank_one_term(backend, dev, shape):
    require_backend("seeded_axpby_", backend, dev)
    gen = _gen()
    t0 = _rand(shape, torch.float32, dev, gen)
    row = _rand((matrix_dims(t0)[1],), torch.float32, dev, gen)
    t, t_ref = t0.clone(), t0.clone()
    _run(backend, lk.seeded_axpby_, [t], 8, 0.3, 1.0, row_vectors=[row], gamma=-0.7)
    _run("reference", lk.seeded_axpby_, [t_ref], 8, 0.3, 1.0, row_vectors=[row], gamma=-0.7)
    torch.testing.assert_close(t.cpu(), t_ref.cpu(), atol=3e-5, rtol=1e-5)
    torch.testing.assert_close(t.double().cpu(), _f64_expected(t0, 8, 0, 0.3, 1.0, row, -0.7), atol=3e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("shape", [(), (1,), (9,), (5, 7), (3, 4, 5), (0, 3), (300, 17)], ids=str)
def test_colsum_and_loren_stats(backend, dev, shape):
    require_backend("seeded_colsum", backend, dev)
    gen = _gen()
    t = _rand(shape, torch.bfloat16, dev, gen)
    before = t.clone()
    m, n = matrix_dims(t)
    row = _rand((n,), torch.float32, dev, gen)
    p, cols = _run(backend, lk.seeded_loren_stats, [t], 31, [row], first_stream=2)
    z = gaussian_flat(t.numel(), 31, 2, compute_dtype=torch.float64).reshape(m, n)
    torch.testing.assert_close(cols[0].double().cpu(), z.sum(0), atol=1e-4 * max(1, m) ** 0.5, rtol=1e-5)
    torch.testing.assert_close(p.double().cpu(), (z * row.double().cpu()).sum().reshape(1), atol=1e-3, rtol=1e-4)
    assert torch.equal(t, before)  # the tensor is only a shape


def test_opcheck_seeded_ops():
    t = [torch.randn(3, 5), torch.randn(7, dtype=torch.bfloat16)]
    axpby = torch.ops.lorenza_kernels.seeded_axpby_.default
    torch.library.opcheck(axpby, (t, 5, [3, 4], [0.5, 1.0], [1.0, 0.0], None, None))
    rows = [torch.randn(5), torch.randn(7)]
    torch.library.opcheck(axpby, (t, -5, [9, 2], [0.5, 1.0], [1.0, 0.5], rows, [0.1, 0.2]))
    torch.library.opcheck(torch.ops.lorenza_kernels.seeded_colsum.default, (t, 7, [1, 0]))


def test_meta_device():
    t = torch.empty(4, 6, device="meta")
    norms = lk.seeded_axpby_([t], 1, 0.5)
    assert norms.device.type == "meta" and norms.shape == (1,)
    assert lk.seeded_colsum([t], 3)[0].shape == (6,)


def test_forcing_the_reference():
    with lk.use_backend("reference"):
        assert _registry.active("seeded_axpby_", "cpu") == "reference"
    with pytest.raises(ValueError, match="backend"):
        with lk.use_backend("fortran"):
            pass
    assert "seeded_axpby_" in lk.backend_info()["ops"]


def _bad_calls():
    ok = [torch.randn(4, 3), torch.randn(5)]
    return [
        ("int tensor", [torch.ones(3, dtype=torch.int32)], {}, "tensors\\[0\\]"),
        ("complex tensor", [torch.ones(3, dtype=torch.complex64)], {}, "tensors\\[0\\]"),
        ("float64 tensor", [torch.ones(3, dtype=torch.float64)], {}, "tensors\\[0\\]"),
        ("two devices", [ok[0], torch.empty(3, device="meta")], {}, "tensors\\[1\\]"),
        ("non-contiguous", [ok[0], torch.randn(4, 6)[:, ::2]], {}, "tensors\\[1\\]"),
        ("negative seed", ok, {"seed": -1}, "seed"),
        ("seed too large", ok, {"seed": 1 << 64}, "seed"),
        ("negative stream", ok, {"first_stream": -1}, "first_stream"),
        ("stream overflow", ok, {"first_stream": (1 << 32) - 1}, "first_stream"),
        ("streams length", ok, {"streams": [1]}, "streams"),
        ("stream in list too large", ok, {"streams": [0, 1 << 32]}, "streams\\[1\\]"),
        ("same tensor twice", [ok[0], ok[0]], {}, "share memory"),
        ("overlapping views", [ok[0].view(-1)[:7], ok[0].view(-1)[5:]], {}, "share memory"),
        ("alpha length", ok, {"alpha": [1.0, 2.0, 3.0]}, "alpha"),
        ("beta length", ok, {"beta": [1.0]}, "beta"),
        ("alpha nan", ok, {"alpha": float("nan")}, "alpha"),
        ("row shape", ok, {"row_vectors": [torch.randn(4), torch.randn(5)], "gamma": 1.0}, "row_vectors\\[0\\]"),
        ("row count", ok, {"row_vectors": [torch.randn(3)], "gamma": 1.0}, "row_vectors"),
        ("gamma alone", ok, {"gamma": 1.0}, "row_vectors"),
        ("not a list", ok[0], {}, "tensors"),
    ]


@pytest.mark.parametrize("name,tensors,kwargs,match", _bad_calls(), ids=[c[0] for c in _bad_calls()])
def test_bad_input_raises_and_changes_nothing(name, tensors, kwargs, match):
    args = {"seed": 3, "alpha": 0.5, **kwargs}
    items = tensors if isinstance(tensors, list) else [tensors]
    before = [t.clone() if t.device.type != "meta" else None for t in items]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        lk.seeded_axpby_(tensors, args.pop("seed"), args.pop("alpha"), **args)
    for t, b in zip(items, before):
        if b is not None:
            assert torch.equal(t, b)


def test_requires_grad_outside_no_grad():
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(RuntimeError, match="no_grad"):
        lk.seeded_axpby_([p], 1, 0.1)
    with torch.no_grad():
        lk.seeded_axpby_([p], 1, 0.1)


def _direct_bad_calls(dev):
    """Calls of ``torch.ops.lorenza_kernels.seeded_axpby_`` itself (no public API in front of it)."""
    t = torch.randn(4, 6, device=dev)
    return [
        ("non-contiguous", ([t.t()], 1, [0], [1.0], [1.0], None, None), ValueError, "contiguous"),
        ("float64", ([t.double()], 1, [0], [1.0], [1.0], None, None), TypeError, "dtype"),
        ("row length", ([t], 1, [0], [1.0], [1.0], [torch.randn(5, device=dev)], [1.0]), ValueError, "row_vectors"),
        ("overlap", ([t, t.view(-1)[1:]], 1, [0, 1], [1.0] * 2, [1.0] * 2, None, None), ValueError, "share memory"),
        ("same tensor", ([t, t], 1, [0, 1], [1.0] * 2, [1.0] * 2, None, None), ValueError, "share memory"),
        ("stream", ([t], 1, [1 << 32], [1.0], [1.0], None, None), ValueError, "streams"),
        ("alpha count", ([t], 1, [0], [1.0, 2.0], [1.0], None, None), ValueError, "alpha"),
        ("beta inf", ([t], 1, [0], [1.0], [float("inf")], None, None), ValueError, "beta"),
    ]


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_every_backend_and_direct_callers_get_the_same_errors(backend, dev):
    # One validator per op runs in front of every backend's kernel, so torch.ops callers get the
    # public API's errors and nothing is written before them.
    require_backend("seeded_axpby_", backend, dev)
    for name, args, exc, match in _direct_bad_calls(dev):
        before = [x.clone() for x in args[0]]
        with lk.use_backend(backend), pytest.raises(exc, match=match):
            torch.ops.lorenza_kernels.seeded_axpby_(*args)
        assert all(torch.equal(x, b) for x, b in zip(args[0], before)), name
    with lk.use_backend(backend), pytest.raises(ValueError, match="streams"):
        torch.ops.lorenza_kernels.seeded_colsum([torch.zeros(3, device=dev)], 1, [0, 1])


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_streams_list_equals_separate_calls(backend, dev):
    # Any streams, in any order, with repeats: tensor k draws from streams[k] exactly as alone.
    require_backend("seeded_axpby_", backend, dev)
    gen = _gen()
    shapes, streams = [(5, 7), (13,), (2, 3, 4), (1,)], [9, 2, (1 << 32) - 1, 9]
    ts = [_rand(s, torch.float32, dev, gen) for s in shapes]
    alone = [t.clone() for t in ts]
    with lk.use_backend(backend):
        norms = lk.seeded_axpby_(ts, 77, 0.5, 1.0, streams=streams)
        cols = lk.seeded_colsum(ts, 77, streams=streams)
        for t, s in zip(alone, streams):
            lk.seeded_axpby_([t], 77, 0.5, 1.0, first_stream=s)
    for k, (t, a, s) in enumerate(zip(ts, alone, streams)):
        assert torch.equal(t, a), k
        z = gaussian_flat(t.numel(), 77, s, compute_dtype=torch.float64)
        assert abs(norms[k].item() - z.square().sum().item()) <= 1e-4 * max(1.0, z.square().sum().item())
        m, n = matrix_dims(t)
        torch.testing.assert_close(cols[k].double().cpu(), z.reshape(m, n).sum(0), atol=1e-4, rtol=1e-5)


def test_version_counters_are_bumped():
    # In place, like torch's own in-place ops: autograd sees that a saved tensor changed.
    t = torch.zeros(5)
    v = t._version
    lk.seeded_axpby_([t], 1, 1.0)
    assert t._version > v
    w = torch.randn(3, requires_grad=True)
    x = w * 1.0
    y = (x * x).sum()  # saves x for backward
    with torch.no_grad():
        lk.seeded_axpby_([x], 1, 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_compiles_fullgraph():
    # The ops are opaque to torch.compile (their fakes give the shapes): one graph, no break.
    def f(a, b):
        norms = torch.ops.lorenza_kernels.seeded_axpby_([a, b], 3, [0, 1], [0.5, 0.5], [1.0, 1.0], None, None)
        (cols,) = torch.ops.lorenza_kernels.seeded_colsum([a], 3, [0])
        return norms.sum() + cols.sum()

    a, b = torch.randn(4, 5), torch.randn(7)
    a2, b2 = a.clone(), b.clone()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(a, b)
    want = f(a2, b2)
    torch.testing.assert_close(got, want)
    assert torch.equal(a, a2) and torch.equal(b, b2)
