"""seeded_linear (docs/kernels.md section 4): F.linear with seeded noise on the weight and bias.

The reference against its definition (a perturbed copy through seeded_axpby_, then F.linear), bitwise
on the CPU; the Triton kernel (noise generated inside the GEMM) against the reference, under
``TRITON_INTERPRET=1`` on the CPU (small shapes: the interpreter is slow) or on a CUDA device; the op's
registration (opcheck, meta and fake tensors, torch.compile) and its errors. Inputs, seeds and streams
are fresh every run; failures print the seed.
"""

from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import TRITON_INTERPRET, dtype_id, poison_

import lorenza_kernels as lk
from lorenza_kernels import _ops, _registry
from lorenza_kernels.reference import seeded_linear as ref
from lorenza_kernels.reference.rng import gaussian_flat

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

#: (atol, rtol) of a Triton result against the reference in the same dtype (K <= 70, |x|, |W| ~ 1,
#: |alpha| <= 1). Both round y once from float32 sums that differ in order (and, on the GPU, by
#: tf32x3's products for float32), so y may differ by one unit in the last place: 2^-7 relative for
#: bfloat16, 2^-9 for float16. W' itself may differ by one unit in the last place where
#: alpha z_W (within 1e-5 of the float64 stream on every backend) lands next to a rounding
#: boundary: |x| ulp(W') ~ 2^-8 |W'| in bfloat16, the absolute terms.
TOL = {torch.float32: (2e-4, 1e-5), torch.bfloat16: (2e-2, 2**-7), torch.float16: (4e-3, 2**-9)}


def _seed() -> int:
    return random.getrandbits(64)


def _i64(seed: int) -> int:
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def _two_step(x, weight, bias, seed, weight_stream, bias_stream, alpha):
    """The definition: perturb copies of the parameters in place with seeded_axpby_, then F.linear."""
    w = weight.clone(memory_format=torch.contiguous_format)
    b = None if bias is None else bias.clone()
    lk.seeded_axpby_([w], seed, alpha, 1.0, streams=[weight_stream])
    if b is not None:
        lk.seeded_axpby_([b], seed, alpha, 1.0, streams=[bias_stream])
    return F.linear(x, w, b)


# --- the reference is the definition ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_reference_is_the_two_step_definition(dtype, with_bias):
    seed = _seed()
    ws, bs = random.randrange(1 << 32), random.randrange(1 << 32)
    x = torch.randn(3, 5, 24).to(dtype)
    weight = torch.randn(11, 24).to(dtype)
    bias = torch.randn(11).to(dtype) if with_bias else None
    want = _two_step(x, weight, bias, seed, ws, bs, 0.37)
    kw = dict(seed=seed, alpha=0.37, weight_stream=ws, bias_stream=bs if with_bias else None)
    assert torch.equal(lk.seeded_linear(x, weight, bias, **kw), want), f"seed={seed}"
    got = ref.seeded_linear(x, weight, bias, _i64(seed), ws, bs, 0.37)
    assert torch.equal(got, want) and got.dtype == dtype and got.shape == (3, 5, 11), f"seed={seed}"
    # a transposed (non-contiguous) weight: the noise follows its logical row-major index
    wt = weight.t().contiguous().t()
    assert torch.equal(ref.seeded_linear(x, wt, bias, _i64(seed), ws, bs, 0.37), want), f"seed={seed}"


def test_probe_equals_perturbing_the_module_in_place():
    # What a zeroth-order optimizer does today (theta + mu z written into the parameters, forward,
    # restore) and what seeded_linear computes without writing them.
    layer = torch.nn.Linear(40, 24)
    x = torch.randn(6, 40)
    seed, mu, stream = _seed(), 1e-3, 17
    before = [p.detach().clone() for p in layer.parameters()]
    with torch.no_grad():
        lk.seeded_axpby_([layer.weight, layer.bias], seed, mu, streams=[stream, stream + 1])
        want = layer(x)
        probe_free = [p.detach().clone() for p in before]
        got = lk.seeded_linear(x, *probe_free, seed=seed, alpha=mu, weight_stream=stream, bias_stream=stream + 1)
    assert torch.equal(got, want), f"seed={seed}"
    assert all(torch.equal(p, b) for p, b in zip(probe_free, before))  # the parameters are untouched


def test_alpha_zero_is_f_linear():
    x, w, b = torch.randn(4, 9, dtype=torch.bfloat16), torch.randn(5, 9, dtype=torch.bfloat16), torch.randn(5)
    b = b.to(torch.bfloat16)
    got = lk.seeded_linear(x, w, b, seed=3, alpha=0.0, weight_stream=1, bias_stream=2)
    assert torch.equal(got, F.linear(x, w, b))


@pytest.mark.parametrize("impl", ["reference", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_empty_and_degenerate_shapes(impl):
    if impl == "triton":
        if not TRITON_INTERPRET and not torch.cuda.is_available():
            pytest.skip("Triton needs TRITON_INTERPRET=1 or a CUDA device")
        dev = "cuda" if not TRITON_INTERPRET else "cpu"
        fn = _registry.implementation("seeded_linear", "triton", dev)
        if fn is None:
            pytest.skip("Triton backend not available here")
    else:
        dev, fn = "cpu", ref.seeded_linear
    seed = _i64(_seed())
    w8, b6 = torch.randn(6, 8, device=dev), torch.randn(6, device=dev)
    assert fn(torch.randn(0, 8, device=dev), w8, b6, seed, 1, 2, 0.5).shape == (0, 6)
    assert fn(torch.randn(2, 0, 8, device=dev), w8, None, seed, 1, 2, 0.5).shape == (2, 0, 6)
    assert fn(torch.randn(3, 8, device=dev), torch.randn(0, 8, device=dev), None, seed, 1, 2, 0.5).shape == (3, 0)
    # in_features = 0: y is the perturbed bias on every row (zeros without a bias)
    x0, w0 = torch.randn(3, 0, device=dev), torch.randn(6, 0, device=dev)
    b_pert = b6.clone()
    lk.seeded_axpby_([b_pert], seed & ((1 << 64) - 1), 0.5, streams=[2])
    torch.testing.assert_close(fn(x0, w0, b6, seed, 1, 2, 0.5), b_pert.expand(3, 6), atol=1e-5, rtol=0)
    assert torch.equal(fn(x0, w0, None, seed, 1, 2, 0.5), torch.zeros(3, 6, device=dev))


# --- Triton (TRITON_INTERPRET=1 on the CPU, or a GPU) ---------------------------------------------------


@pytest.fixture
def dev() -> str:
    """Interpreter on the CPU when TRITON_INTERPRET=1, else the GPU; decided lazily (never at collection)."""
    if TRITON_INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU interpreter) or a CUDA device")


@pytest.fixture
def triton_linear(dev):
    fn = _registry.implementation("seeded_linear", "triton", dev)
    if fn is None:
        pytest.skip(f"the Triton backend does not implement seeded_linear on {dev} here")
    return fn


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled floating tensors: an output element the kernel forgets to
    write shows up as NaN."""
    empty = torch.empty

    def _empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return poison_(t) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", _empty)


def _case(name: str, dtype: torch.dtype, dev: str):
    """(x, weight): shapes that are not multiples of the blocks, in % 4 != 0, one row, 3-D and strided."""
    r = lambda *s: torch.randn(*s, device=dev).to(dtype)  # noqa: E731
    if name == "odd":  # M, N, K not multiples of 16; K % 4 == 0 (four normals per Philox call)
        return r(19, 68), r(37, 68)
    if name == "k-not-4":  # one Philox call per element, 3-D x
        return r(5, 3, 33), r(21, 33)
    if name == "one-row":
        return r(1, 48), r(40, 48)
    if name == "strided":  # x (2, 9, 52) whose leading dims do not merge (copied), W transposed
        return r(9, 2, 52).transpose(0, 1), r(52, 23).t()
    if name == "x-transposed":  # x (13, 50) with strides (1, 13): any strides, no copy
        return r(50, 13).t(), r(18, 50)
    if name == "tiny":  # every dimension below one block
        return r(3, 5), r(2, 5)
    raise AssertionError(name)


CASES = ["odd", "k-not-4", "one-row", "strided", "x-transposed", "tiny"]


def _truth(x, weight, bias, seed, ws, bs, alpha):
    """float64 y with the float64 stream and unrounded W', b' (to bound each result's own error)."""
    z = gaussian_flat(weight.numel(), seed, ws, compute_dtype=torch.float64).reshape(weight.shape)
    w = weight.cpu().double() + alpha * z
    b = None
    if bias is not None:
        b = bias.cpu().double() + alpha * gaussian_flat(bias.numel(), seed, bs, compute_dtype=torch.float64)
    return F.linear(x.cpu().double(), w, b)


def _check(got, want, truth, msg):
    assert got.shape == want.shape and got.dtype == want.dtype, msg
    assert not got.isnan().any(), f"{msg}: NaN (an output element was not written)"
    atol, rtol = TOL[got.dtype]
    torch.testing.assert_close(got.cpu().float(), want.cpu().float(), atol=atol, rtol=rtol, msg=lambda m: f"{msg}: {m}")
    if got.dtype != torch.float32 and got.numel():
        # flash-attention's rule: no worse than twice the reference's own error against float64
        # (16-bit only: in float32 the GPU's tf32x3 products alone may exceed a tiny reference error).
        err, err_ref = ((t.cpu().double() - truth).abs().max().item() for t in (got, want))
        assert err <= 2 * err_ref + 1e-5, f"{msg}: error {err} vs reference {err_ref}"


@pytest.mark.triton_interpret
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(dev, triton_linear, poisoned_empty, case, dtype, with_bias):
    x, weight = _case(case, dtype, dev)
    bias = torch.randn(weight.shape[0], device=dev).to(dtype) if with_bias else None
    seed = _seed() | (1 << 63)  # the int64 encoding is negative
    ws, bs = (1 << 32) - 1 - random.randrange(4), (1 << 32) - 5 - random.randrange(4)
    alpha = random.choice([0.75, -0.5, 1e-3])
    args = (x, weight, bias, _i64(seed), ws, bs, alpha)
    got = triton_linear(*args)
    want = ref.seeded_linear(*args)
    _check(got, want, _truth(x, weight, bias, seed, ws, bs, alpha), f"{case} seed={seed} alpha={alpha}")


@pytest.mark.triton_interpret
def test_triton_small_seed_and_streams(dev, triton_linear):
    # Small ints reach Triton as i32 (large ones as i64); the kernel widens both to the same bits.
    x, weight = _case("odd", torch.float32, dev)
    bias = torch.randn(weight.shape[0], device=dev)
    for seed, ws, bs in [(0, 0, 1), (1, 1, 0), (-1, 5, 7), (2**31 - 1, 2**31, 2**31 - 1), (-(2**31), 3, 4)]:
        args = (x, weight, bias, seed, ws, bs, 0.5)
        _check(triton_linear(*args), ref.seeded_linear(*args), _truth(*args[:3], seed % 2**64, ws, bs, 0.5), f"{seed}")


@pytest.mark.triton_interpret
@pytest.mark.parametrize("k", [64, 50], ids=["quad", "per-element"])
def test_triton_in_kernel_noise_is_the_stream(dev, triton_linear, k):
    """W = 0, x = I: y = W'^T = (alpha z_W)^T, and with x = 0: y = b' on every row. Every element
    within docs/rng.md's 1e-5 (times alpha) of the float64 stream."""
    seed, ws, bs, alpha, n = (1 << 64) - 3, (1 << 32) - 1, 7, 0.5, 36
    eye, zero_w = torch.eye(k, device=dev), torch.zeros(n, k, device=dev)
    y = triton_linear(eye, zero_w, None, _i64(seed), ws, 0, alpha)
    z = gaussian_flat(n * k, seed, ws, compute_dtype=torch.float64).reshape(n, k)
    torch.testing.assert_close(y.cpu().double(), alpha * z.T, atol=alpha * 1e-5 + 1e-6, rtol=0)
    b = torch.randn(n, device=dev)
    y = triton_linear(torch.zeros(3, k, device=dev), zero_w, b, _i64(seed), ws, bs, alpha)
    zb = gaussian_flat(n, seed, bs, compute_dtype=torch.float64)
    torch.testing.assert_close(y.cpu().double(), (b.cpu().double() + alpha * zb).expand(3, n), atol=1e-5, rtol=0)


@pytest.mark.triton_interpret
def test_triton_through_the_dispatcher_is_deterministic(dev, triton_linear):
    x, weight = _case("k-not-4", torch.bfloat16, dev)
    bias = torch.randn(weight.shape[0], device=dev).to(torch.bfloat16)
    seed = _seed()
    direct = triton_linear(x, weight, bias, _i64(seed), 3, 4, 0.25)
    with lk.use_backend("triton"):
        assert _registry.active("seeded_linear", dev) == "triton"
        again = lk.seeded_linear(x, weight, bias, seed=seed, alpha=0.25, weight_stream=3, bias_stream=4)
    assert torch.equal(direct, again), f"seed={seed}"


def test_triton_kernel_compiles_for_sm90():
    """No GPU here: Triton's own compiler and ptxas lower the kernel for sm_90 (wgmma tensor cores)
    at the tiles the launcher picks for a 7B-model layer, for 16-bit and float32 operands."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia import compiler as _nv  # noqa: F401
        from triton.compiler import ASTSource
    except ImportError as e:
        pytest.skip(f"this Triton cannot compile for NVIDIA GPUs: {e}")
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not os.path.exists(os.path.join(bin_dir, "ptxas")):
        pytest.skip("no ptxas shipped with this Triton")
    from lorenza_kernels.triton import seeded_linear as tsl

    kern = tsl._seeded_linear_kernel
    strides = ["stride_xm", "stride_xk", "stride_wn", "stride_wk", "stride_b", "stride_ym", "stride_yn"]
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        cfg = _gpu_config(tsl, 4096, 4096, 4096, dtype)
        # fusion as on a launch (Triton 3.9's default), stated to keep its warning quiet
        opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")} | {"enable_fp_fusion": True}
        sig = {p: f"*{name}" for p in ("x_ptr", "w_ptr", "b_ptr", "y_ptr")}
        sig.update(seed="i64", w_stream="i64", b_stream="i64", alpha="fp32", M="i32", N="i32", K="i32")
        sig.update({s: "i32" for s in strides})
        for quad in (True, False):
            consts = dict(HAS_BIAS=True, QUAD=quad, LOW_DOT=dtype != torch.float32, PREC=tsl.FP32_PRECISION)
            consts.update(RNE_BY_HAND=False, **cfg)
            src = ASTSource(
                fn=kern,
                signature={**sig, **{k: "constexpr" for k in consts}},
                constexprs={(kern.arg_names.index(k),): v for k, v in consts.items()},
            )
            compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
            assert "wgmma" in compiled.asm["ptx"], (name, quad)
            assert compiled.asm["cubin"], (name, quad)


def _gpu_config(tsl, M, N, K, dtype):
    """``config`` as it is on a GPU (this process may run the interpreter)."""
    interpret = tsl.INTERPRET
    tsl.INTERPRET = False
    try:
        return tsl.config(M, N, K, dtype)
    finally:
        tsl.INTERPRET = interpret


# --- the op: registration, tracing, errors ------------------------------------------------------------


def test_opcheck():
    x, w, b = torch.randn(2, 3, 8), torch.randn(5, 8), torch.randn(5)
    torch.library.opcheck(_ops.seeded_linear, (x, w, b, -5, 3, 4, 0.5))
    torch.library.opcheck(_ops.seeded_linear, (x.bfloat16(), w.bfloat16(), None, 7, 0, 0, -0.25))


def test_meta_and_fake_shapes():
    x, w, b = torch.empty(2, 3, 8, device="meta"), torch.empty(5, 8, device="meta"), torch.empty(5, device="meta")
    y = lk.seeded_linear(x, w, b, seed=1, alpha=0.5, weight_stream=0, bias_stream=1)
    assert y.device.type == "meta" and y.shape == (2, 3, 5) and y.dtype == torch.float32
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(7, 16, dtype=torch.bfloat16)
        y = _ops.seeded_linear(x, torch.empty(4, 16, dtype=torch.bfloat16), None, 3, 1, 0, 1.0)
        assert y.shape == (7, 4) and y.dtype == torch.bfloat16
        with pytest.raises(ValueError, match="x: expected shape"):
            _ops.seeded_linear(torch.empty(7, 15), torch.empty(4, 16), None, 3, 1, 0, 1.0)


def test_compiles_fullgraph():
    # The op is opaque to torch.compile (its fake gives the shape): one graph, no break.
    def probe(x, w, b):
        y = torch.ops.lorenza_kernels.seeded_linear(x, w, b, 11, 2, 3, 1e-3)
        return torch.relu(y).sum(-1)

    x, w, b = torch.randn(3, 4, 10), torch.randn(6, 10), torch.randn(6)
    got = torch.compile(probe, fullgraph=True, backend="aot_eager")(x, w, b)
    torch.testing.assert_close(got, probe(x, w, b), atol=0, rtol=0)


def _public_bad_calls():
    x, w, b = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3)
    kw = dict(seed=1, alpha=0.5, weight_stream=2, bias_stream=3)
    return [
        ("x dtype", (x.bfloat16(), w, b), {}, TypeError, "x: dtype bfloat16 must equal weight's float32"),
        ("weight float64", (x.double(), w.double(), None), {}, TypeError, "weight: dtype float64"),
        ("weight int", (x, w.int(), None), {}, TypeError, "weight: dtype int32"),
        ("weight 1-D", (x, w[0], None), {}, ValueError, "weight: expected a 2-D"),
        ("weight 3-D", (x, w[None], None), {}, ValueError, "weight: expected a 2-D"),
        ("in_features", (torch.randn(4, 5), w, b), {}, ValueError, r"x: expected shape \(\.\.\., 6\)"),
        ("x 0-d", (torch.tensor(1.0), w, b), {}, ValueError, "x: expected shape"),
        ("bias length", (x, w, torch.randn(4)), {}, ValueError, r"bias: expected shape \(3,\)"),
        ("bias 2-D", (x, w, b[None]), {}, ValueError, "bias: expected shape"),
        ("bias dtype", (x, w, b.half()), {}, TypeError, "bias: dtype float16"),
        ("bias device", (x, w, torch.empty(3, device="meta")), {}, ValueError, "bias: on meta"),
        ("x device", (torch.empty(4, 6, device="meta"), w, b), {}, ValueError, "x: on meta"),
        ("negative seed", (x, w, b), {"seed": -1}, ValueError, "seed"),
        ("seed too large", (x, w, b), {"seed": 1 << 64}, ValueError, "seed"),
        ("float seed", (x, w, b), {"seed": 1.5}, TypeError, "seed"),
        ("weight_stream negative", (x, w, b), {"weight_stream": -1}, ValueError, "weight_stream"),
        ("weight_stream too large", (x, w, b), {"weight_stream": 1 << 32}, ValueError, "weight_stream"),
        ("bias_stream too large", (x, w, b), {"bias_stream": 1 << 32}, ValueError, "bias_stream"),
        ("bias without bias_stream", (x, w, b), {"bias_stream": None}, ValueError, "bias_stream: required"),
        ("alpha nan", (x, w, b), {"alpha": float("nan")}, ValueError, "alpha: must be finite"),
        ("alpha inf", (x, w, b), {"alpha": float("-inf")}, ValueError, "alpha: must be finite"),
        ("alpha str", (x, w, b), {"alpha": "0.1"}, TypeError, "alpha"),
    ], kw


@pytest.mark.parametrize("case", range(len(_public_bad_calls()[0])), ids=[c[0] for c in _public_bad_calls()[0]])
def test_bad_input_public(case):
    calls, kw = _public_bad_calls()
    _, args, extra, exc, match = calls[case]
    with pytest.raises(exc, match=match):
        lk.seeded_linear(*args, **{**kw, **extra})


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.triton_interpret)])
def test_bad_input_direct(backend):
    # torch.ops callers get the same validator, in front of every backend's kernel (CPU tensors).
    if backend == "triton" and _registry.implementation("seeded_linear", "triton", "cpu") is None:
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1")
    x, w, b = torch.randn(4, 6), torch.randn(3, 6), torch.randn(3)
    op = torch.ops.lorenza_kernels.seeded_linear
    calls = [
        ((x.half(), w, b, 1, 2, 3, 0.5), TypeError, "x: dtype"),
        ((x, w.view(-1), None, 1, 2, 3, 0.5), ValueError, "weight: expected a 2-D"),
        ((x, w, b[:2], 1, 2, 3, 0.5), ValueError, "bias: expected shape"),
        ((x, w, b, 1, 1 << 32, 3, 0.5), ValueError, "weight_stream"),
        ((x, w, b, 1, 2, -1, 0.5), ValueError, "bias_stream"),
        ((x, w, b, 1, 2, 3, float("inf")), ValueError, "alpha"),
        ((x, w, b, 1, 2, 3, float("nan")), ValueError, "alpha"),
    ]
    with lk.use_backend(backend):
        for args, exc, match in calls:
            with pytest.raises(exc, match=match):
                op(*args)
        # bias_stream is ignored without a bias
        assert op(x, w, None, 1, 2, -1, 0.5).shape == (4, 3)


def test_grad_mode_is_refused():
    layer = torch.nn.Linear(6, 3)
    x = torch.randn(2, 6)
    kw = dict(seed=1, alpha=1e-3, weight_stream=0, bias_stream=1)
    for args, name in [((x, layer.weight, None), "weight"), ((x, layer.weight.detach(), layer.bias), "bias")]:
        with pytest.raises(RuntimeError, match=f"{name}: requires grad.*torch.no_grad"):
            lk.seeded_linear(*args, **kw)
    with pytest.raises(RuntimeError, match="x: requires grad"):
        lk.seeded_linear(x.clone().requires_grad_(), layer.weight.detach(), None, **kw)
    with pytest.raises(RuntimeError, match="weight: requires grad"):
        _ops.seeded_linear(x, layer.weight, None, 1, 0, 0, 0.1)
    with torch.no_grad():
        y = lk.seeded_linear(x, layer.weight, layer.bias, **kw)
    assert not y.requires_grad and y.shape == (2, 3)
