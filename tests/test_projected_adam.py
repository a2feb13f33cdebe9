"""projected_adam_step_ and moment_transform_: every backend against the reference, and the
reference against torch.optim.AdamW itself (identity basis, scale 1)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from conftest import dtype_id, require_backend

import lorenza_kernels as lk
from lorenza_kernels.reference.rng import stochastic_round_range

OP = "projected_adam_step_"
SIDES = ("left", "right")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
HYPER = dict(lr=3e-2, beta1=0.9, beta2=0.99, eps=1e-6, weight_decay=0.1, scale=0.25)
FAST = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton-interp", marks=pytest.mark.triton_interpret),
]


def _basis(d: int, r: int, dtype=F32) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, r, dtype=torch.float64))[0].to(dtype)


def _layer(shape, r, side, pdt=F32, mdt=F32, qdt=None):
    """Fresh random (param, proj, exp_avg, exp_avg_sq) for a param of ``shape`` (shape[0] x rest)."""
    m = shape[0]
    n = torch.Size(shape[1:]).numel()
    q = _basis(m if side == "left" else n, r, qdt or pdt)
    mshape = (r, n) if side == "left" else (m, r)
    return torch.randn(shape).to(pdt), q, torch.randn(mshape).to(mdt) * 0.1, torch.rand(mshape).to(mdt) * 0.01


def _tol(dtype: torch.dtype, ulps: float = 1.0) -> dict:
    if dtype == F32:
        return dict(atol=2e-6, rtol=2e-5)
    return dict(atol=1e-5, rtol=ulps * torch.finfo(dtype).eps)  # 1 ulp: both round the same fp32 value


def _run(backend, w, q, ma, va, grads, steps, side, rs):
    with lk.use_backend(backend):
        for step, g in zip(steps, grads):
            lk.projected_adam_step_(w, g, q, ma, va, step=step, side=side, residual_scale=rs, **HYPER)


CASES = [
    pytest.param(side, pdt, mdt, qdt, rs, id=f"{side}-p{dtype_id(pdt)}-m{dtype_id(mdt)}-q{dtype_id(qdt)}-rs{rs}")
    for side in SIDES
    for pdt, qdt in ((F32, F32), (BF16, BF16), (F16, F16), (BF16, F32))
    for mdt in (F32, BF16)
    for rs in (0.0, 0.5)
]


def _check_against_reference(backend, side, pdt, mdt, qdt, rs, shape, r, n_steps, ulps):
    """Steps 1..n_steps; before each, the reference restarts from the backend's state, so a
    one-ulp rounding difference is not amplified by later steps (bf16 moments near 0 would)."""
    require_backend(OP, backend, "cpu")
    w, q, ma, va = _layer(shape, r, side, pdt, mdt, qdt)
    for step in range(1, n_steps + 1):
        g = torch.randn(shape).to(pdt)
        ref = [t.clone() for t in (w, ma, va)]
        _run("reference", ref[0], q, ref[1], ref[2], [g], [step], side, rs)
        _run(backend, w, q, ma, va, [g], [step], side, rs)
        torch.testing.assert_close(w, ref[0], **_tol(pdt, ulps))
        torch.testing.assert_close(ma, ref[1], **_tol(mdt, ulps))
        torch.testing.assert_close(va, ref[2], **_tol(mdt, ulps))


@pytest.mark.parametrize("blocks", ["one-block", "tiny-blocks"])
@pytest.mark.parametrize("side,pdt,mdt,qdt,rs", CASES)
def test_cpu_matches_reference(side, pdt, mdt, qdt, rs, blocks, monkeypatch):
    # 3-D param: viewed as 19 x 15. Three steps so bias correction and moments both matter.
    # Tiny blocks: 4 rows (columns) per block of W / G and 7 elements per Adam chunk, with
    # partial last blocks, so that the blocking of every pass is exercised at this size.
    if blocks == "tiny-blocks":
        from lorenza_kernels.cpu import projected_adam as cpu_impl

        monkeypatch.setattr(cpu_impl, "_BLOCK_BYTES", 16)
        monkeypatch.setattr(cpu_impl, "_ADAM_CHUNK", 7)
    _check_against_reference("cpu", side, pdt, mdt, qdt, rs, (19, 3, 5), 4, 3, ulps=1)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("side,pdt,mdt,qdt,rs", [c for c in CASES if c.values[2] == c.values[1] or c.values[1] == F32])
def test_triton_matches_reference(side, pdt, mdt, qdt, rs):
    # Odd sizes straddle the interpreter's 32 x 16 tiles. The interpreter rounds fp32 -> bf16
    # toward zero, not to nearest: one ulp.
    _check_against_reference("triton", side, pdt, mdt, qdt, rs, (37, 23), 5, 2, ulps=1)


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *FAST])
@pytest.mark.parametrize("side", SIDES)
def test_identity_basis_is_adamw(backend, side):
    """Q = I, scale 1: exactly torch.optim.AdamW, parameters and state, every step."""
    require_backend(OP, backend, "cpu")
    m, n = 12, 9
    w = torch.randn(m, n)
    q = torch.eye(m if side == "left" else n)
    ma, va = torch.zeros(m, n), torch.zeros(m, n)
    p = torch.nn.Parameter(w.clone())
    hyper = dict(HYPER, scale=1.0)
    opt = torch.optim.AdamW([p], lr=hyper["lr"], betas=(hyper["beta1"], hyper["beta2"]), eps=hyper["eps"],
                            weight_decay=hyper["weight_decay"], foreach=False)  # fmt: skip
    for step in range(1, 6):
        g = torch.randn(m, n)
        p.grad = g.clone()
        opt.step()
        with lk.use_backend(backend):
            lk.projected_adam_step_(w, g, q, ma, va, step=step, side=side, residual_scale=0.7, **hyper)
        st = opt.state[p]
        torch.testing.assert_close(w, p.detach(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ma, st["exp_avg"], atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(va, st["exp_avg_sq"], atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *FAST])
@pytest.mark.parametrize("side", SIDES)
def test_batched_equals_looped(backend, side):
    require_backend(OP, backend, "cpu")
    layers = [_layer((10, 2, 7), 3, side) for _ in range(3)]
    grads = [torch.randn(10, 2, 7) for _ in layers]
    steps = [1, 4, 2]
    looped = [[t.clone() for t in layer] for layer in layers]
    with lk.use_backend(backend):
        for (w, q, ma, va), g, s in zip(looped, grads, steps):
            lk.projected_adam_step_(w, g, q, ma, va, step=s, side=side, residual_scale=0.5, **HYPER)
        listed = [[t.clone() for t in layer] for layer in layers]
        ws, qs, mas, vas = (list(x) for x in zip(*listed))
        lk.projected_adam_step_batched_(ws, grads, qs, mas, vas, step=steps, side=side, residual_scale=0.5, **HYPER)
        stacked = [torch.stack([layer[k] for layer in layers]) for k in range(4)]
        lk.projected_adam_step_batched_(stacked[0], torch.stack(grads), *stacked[1:], step=steps, side=side,
                                        residual_scale=0.5, **HYPER)  # fmt: skip
    for i, want in enumerate(looped):
        for k in (0, 2, 3):  # param, exp_avg, exp_avg_sq: the same kernels, so bit for bit
            torch.testing.assert_close(listed[i][k], want[k], atol=0, rtol=0)
            # Views into one stacked tensor are not 64-byte aligned and MKL's GEMM blocking
            # depends on alignment: equal to rounding only.
            torch.testing.assert_close(stacked[k][i], want[k], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("rs", [0.0, 0.5])
@pytest.mark.parametrize("side", SIDES)
def test_cpu_foreach_epilogue_equals_the_chunked_one(side, rs, monkeypatch):
    """The CPU backend runs the Adam epilogue of small float32-moment layers as grouped
    ``torch._foreach_*`` calls, the rest chunk by chunk per layer: the same ops, the same bits.
    A batch with mixed steps, grouped three ways (groups of two layers, one layer each, one group
    for all), against the per-layer chunked path."""
    require_backend(OP, "cpu", "cpu")
    from lorenza_kernels.cpu import projected_adam as cpu_impl

    shapes = [(13, 5)] * 6  # one batch, one shape
    layers = [_layer(shape, 3, side) for shape in shapes]
    grads = [torch.randn(shape) for shape in shapes]
    steps = [random.randint(1, 9) for _ in shapes]

    def run(chunk: int, group_numel: int) -> list[list[torch.Tensor]]:
        monkeypatch.setattr(cpu_impl, "_ADAM_CHUNK", chunk)
        monkeypatch.setattr(cpu_impl, "_FOREACH_NUMEL", group_numel)
        out = [[t.clone() for t in layer] for layer in layers]
        ws, qs, mas, vas = (list(x) for x in zip(*out))
        with lk.use_backend("cpu"):
            lk.projected_adam_step_batched_(ws, grads, qs, mas, vas, step=steps, side=side, residual_scale=rs, **HYPER)
        return out

    pair = 2 * layers[0][2].numel()  # a group holds two layers' moments
    chunked = run(7, 0)  # every layer alone, in chunks of 7 elements
    assert len(cpu_impl._groups([t[2] for t in layers], [t[3] for t in layers])) == len(shapes)
    for chunk, group_numel in ((1 << 16, pair), (1 << 16, 0), (1 << 16, 1 << 20)):
        got = run(chunk, group_numel)
        for i, (a, b) in enumerate(zip(got, chunked)):
            for k in (0, 2, 3):  # param, exp_avg, exp_avg_sq
                assert torch.equal(a[k], b[k]), f"layer {i}, tensor {k}, groups of {group_numel} elements"
    monkeypatch.setattr(cpu_impl, "_FOREACH_NUMEL", pair)
    assert len(cpu_impl._groups([t[2] for t in layers], [t[3] for t in layers])) == 3


def test_empty_param_is_a_no_op():
    w, q = torch.empty(4, 0), _basis(4, 2)
    ma, va = torch.empty(2, 0), torch.empty(2, 0)
    for backend in ("reference", "cpu"):
        with lk.use_backend(backend):
            lk.projected_adam_step_(w, w.clone(), q, ma, va, step=1, lr=0.1, side="left")


# --- moment transform ------------------------------------------------------------------------


@pytest.mark.parametrize("mdt", [F32, BF16], ids=dtype_id)
@pytest.mark.parametrize("side", SIDES)
def test_rotate(side, mdt):
    d, r, other = 16, 5, 7
    q_old, q_new = _basis(d, r), _basis(d, r)
    shape = (r, other) if side == "left" else (other, r)
    ma, va = torch.randn(shape).to(mdt), torch.rand(shape).to(mdt)
    m0, v0 = ma.clone(), va.clone()
    lk.moment_transform_(ma, va, q_old, q_old.clone(), side=side, mode="rotate")  # same basis
    torch.testing.assert_close(ma, m0, **_tol(mdt, 1) if mdt != F32 else dict(atol=1e-6, rtol=1e-5))
    torch.testing.assert_close(va, v0, **_tol(mdt, 1) if mdt != F32 else dict(atol=1e-6, rtol=1e-5))
    lk.moment_transform_(ma, va, q_old, q_new, side=side, mode="rotate")
    o = q_new.t() @ q_old
    want_m = o @ m0.float() if side == "left" else m0.float() @ o.t()
    want_v = (o * o) @ v0.float() if side == "left" else v0.float() @ (o * o).t()
    torch.testing.assert_close(ma.float(), want_m, **_tol(mdt, 2) if mdt != F32 else {})
    torch.testing.assert_close(va.float(), want_v, **_tol(mdt, 2) if mdt != F32 else {})
    assert (va >= 0).all()


@pytest.mark.parametrize("side", SIDES)
def test_keep_and_reset(side):
    q_old, q_new = _basis(9, 3), _basis(9, 3)
    shape = (3, 4) if side == "left" else (4, 3)
    ma, va = torch.randn(shape), torch.rand(shape)
    m0, v0 = ma.clone(), va.clone()
    lk.moment_transform_(ma, va, q_old, q_new, side=side, mode="keep")
    assert torch.equal(ma, m0) and torch.equal(va, v0)
    lk.moment_transform_(ma, va, q_old, q_new, side=side, mode="reset")
    assert not ma.any() and not va.any()


def test_moment_transform_batched_equals_looped():
    qs_old, qs_new = torch.stack([_basis(8, 3) for _ in range(3)]), torch.stack([_basis(8, 3) for _ in range(3)])
    ma, va = torch.randn(3, 3, 5), torch.rand(3, 3, 5)
    want = [(a.clone(), b.clone()) for a, b in zip(ma, va)]
    for (a, b), qo, qn in zip(want, qs_old, qs_new):
        lk.moment_transform_(a, b, qo, qn, side="left")
    lk.moment_transform_(ma, va, qs_old, qs_new, side="left")
    for i, (a, b) in enumerate(want):
        assert torch.equal(ma[i], a) and torch.equal(va[i], b)


# --- the torch.library contract ----------------------------------------------------------------


@pytest.mark.parametrize("side", SIDES)
def test_opcheck_projected_adam_step(side):
    layers = [_layer((6, 5), 2, side, BF16) for _ in range(2)]
    ws, qs, mas, vas = (list(x) for x in zip(*layers))
    grads = [torch.randn(6, 5).to(BF16) for _ in layers]
    args = (ws, grads, qs, mas, vas, [1, 3], 0.1, 0.9, 0.999, 1e-8, 0.01, 0.25, side, 0.5)
    torch.library.opcheck(torch.ops.lorenza_kernels.projected_adam_step_.default, args)


@pytest.mark.parametrize("mode", ["rotate", "keep", "reset"])
def test_opcheck_moment_transform(mode):
    args = ([torch.randn(3, 5)], [torch.rand(3, 5)], [_basis(7, 3)], [_basis(7, 3)], "left", mode)
    torch.library.opcheck(torch.ops.lorenza_kernels.moment_transform_.default, args)


# --- validation: clear errors naming the argument, nothing modified ------------------------------


def _valid(side="left"):
    w, q, ma, va = _layer((8, 6), 3, side)
    return dict(param=w, grad=torch.randn(8, 6), proj=q, exp_avg=ma, exp_avg_sq=va, step=1, lr=0.1, side=side)


BAD = {
    "side": (dict(side="up"), "side"),
    "grad-shape": (dict(grad=torch.randn(8, 5)), "grad"),
    "grad-device": (dict(grad=torch.randn(8, 6, device="meta")), "grad"),
    "grad-dtype": (dict(grad=torch.randn(8, 6, dtype=torch.float64)), "grad"),
    "param-dtype": (dict(param=torch.zeros(8, 6, dtype=torch.int32)), "param"),
    "param-noncontig": (dict(param=torch.randn(6, 8).t()), "param"),
    "proj-rows": (dict(proj=_basis(6, 3)), "proj"),
    "rank-0": (dict(proj=torch.empty(8, 0), exp_avg=torch.empty(0, 6), exp_avg_sq=torch.empty(0, 6)), "proj"),
    "rank-too-big": (dict(proj=torch.randn(8, 9), exp_avg=torch.zeros(9, 6), exp_avg_sq=torch.zeros(9, 6)), "proj"),
    "moment-shape": (dict(exp_avg=torch.zeros(6, 3)), "exp_avg"),
    "moment-dtype": (dict(exp_avg_sq=torch.zeros(3, 6, dtype=F16)), "exp_avg_sq"),
    "aliased-moments": (dict(exp_avg_sq=None), "share memory"),
    "lr": (dict(lr=-1e-3), "lr"),
    "eps": (dict(eps=-1e-8), "eps"),
    "beta1": (dict(beta1=1.0), "beta1"),
    "beta2": (dict(beta2=-0.5), "beta2"),
    "weight_decay": (dict(weight_decay=-0.1), "weight_decay"),
    "lr-nan": (dict(lr=float("nan")), "lr"),
    "step": (dict(step=0), "step"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_raises_and_leaves_everything_untouched(case):
    kwargs = _valid()
    override, needle = BAD[case]
    kwargs.update(override)
    if case == "aliased-moments":
        kwargs["exp_avg_sq"] = kwargs["exp_avg"]
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.device.type == "cpu"}
    with pytest.raises((ValueError, TypeError, RuntimeError), match=needle):
        lk.projected_adam_step_(**kwargs)
    for k, v in before.items():
        assert torch.equal(kwargs[k], v), f"{k} was modified by a rejected call"


def test_bad_batch_raises_and_leaves_everything_untouched():
    a, b = _valid(), _valid()
    b["param"] = torch.randn(8, 6).to(BF16)
    b["grad"] = b["grad"].to(BF16)
    before = [t.clone() for t in (a["param"], b["param"], a["exp_avg"], b["exp_avg"])]
    with pytest.raises(ValueError, match=r"params\[1\]"):
        lk.projected_adam_step_batched_([a["param"], b["param"]], [a["grad"], b["grad"]], [a["proj"], b["proj"]],
                                        [a["exp_avg"], b["exp_avg"]], [a["exp_avg_sq"], b["exp_avg_sq"]],
                                        step=1, lr=0.1, side="left")  # fmt: skip
    with pytest.raises(ValueError, match="step"):
        lk.projected_adam_step_batched_([a["param"]], [a["grad"]], [a["proj"]], [a["exp_avg"]], [a["exp_avg_sq"]],
                                        step=[1, 2], lr=0.1, side="left")  # fmt: skip
    after = (a["param"], b["param"], a["exp_avg"], b["exp_avg"])
    assert all(torch.equal(x, y) for x, y in zip(before, after))


@pytest.mark.parametrize(
    "override,needle",
    [
        (dict(mode="spin"), "mode"),
        (dict(side="top"), "side"),
        (dict(proj_new=_basis(7, 2)), "proj_new"),
        (dict(exp_avg=torch.zeros(2, 5)), "exp_avg"),
        (dict(exp_avg_sq=torch.zeros(3, 4)), "exp_avg_sq"),
        (dict(proj_old=torch.zeros(7, 3, dtype=torch.int64)), "proj_old"),
    ],
)
def test_bad_moment_transform_raises_and_leaves_everything_untouched(override, needle):
    kwargs = dict(exp_avg=torch.randn(3, 5), exp_avg_sq=torch.rand(3, 5), proj_old=_basis(7, 3),
                  proj_new=_basis(7, 3), side="left", mode="reset")  # fmt: skip
    kwargs.update(override)
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with pytest.raises((ValueError, TypeError), match=needle):
        lk.moment_transform_(**kwargs)
    for k, v in before.items():
        assert torch.equal(kwargs[k], v)


def test_compiles_fullgraph():
    # Opaque to torch.compile through their fakes: one graph, the same update as eager.
    def step(w, g, q, m, v):
        torch.ops.lorenza_kernels.projected_adam_step_([w], [g], [q], [m], [v], [1], 1e-2, 0.9, 0.999, 1e-8, 0.0,
                                                        1.0, "right", 0.0)  # fmt: skip
        torch.ops.lorenza_kernels.moment_transform_([m], [v], [q], [q], "right", "rotate")
        return w.sum()

    def fresh():
        torch.manual_seed(0)
        q = torch.linalg.qr(torch.randn(6, 3))[0]
        return torch.randn(8, 6), torch.randn(8, 6), q, torch.zeros(8, 3), torch.zeros(8, 3)

    eager, compiled = fresh(), fresh()
    want = step(*eager)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled)
    torch.testing.assert_close(got, want)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b)


# --- stochastic rounding of the parameter (docs/rng.md, "The rounding stream") ---------------------

ROUNDING_BACKENDS = [pytest.param("reference", id="reference"), *FAST]


def _sr_of(w32: torch.Tensor, dtype: torch.dtype, seed: int, stream: int) -> torch.Tensor:
    """The reference's stochastic rounding of a float32 parameter image (its m x n flat order)."""
    return stochastic_round_range(w32, 0, seed, stream, dtype).view(w32.shape)


def _step_pair(backend, w, g, q, ma, va, seed, stream, **kw):
    """One step of ``backend`` with stochastic rounding, and the same step on a float32 copy of the
    parameter (its float32 value before rounding); returns (w, m, v, w32, m32, v32), inputs untouched."""
    out = [t.clone() for t in (w, ma, va)]
    w32, m32, v32 = w.float(), ma.clone(), va.clone()
    with lk.use_backend(backend):
        lk.projected_adam_step_(out[0], g, q, out[1], out[2], rounding_seed=seed, rounding_stream=stream, **kw)
        lk.projected_adam_step_(w32, g, q, m32, v32, **kw)
    return (*out, w32, m32, v32)


@pytest.mark.parametrize("blocks", ["one-block", "tiny-blocks"])
@pytest.mark.parametrize("rs", [0.0, 0.5])
@pytest.mark.parametrize("pdt", [BF16, F16], ids=dtype_id)
@pytest.mark.parametrize("side", SIDES)
@pytest.mark.parametrize("backend", ROUNDING_BACKENDS)
def test_rounding_matches_reference(backend, side, pdt, rs, blocks, monkeypatch):
    """Three steps with a rounding seed. Each backend's parameter is, bit for bit, the reference's
    stochastic rounding of the float32 value the backend computes (the same call on a float32 copy
    of the parameter: the arithmetic does not depend on W's storage dtype); so wherever that value
    equals the reference backend's, the stored bits are the reference's too, and elsewhere they are
    at most one ulp apart. The moments are those of the unrounded call. Tiny blocks (CPU): W is
    written back in blocks of 4 rows, each rounded with its element offset."""
    require_backend(OP, backend, "cpu")
    if blocks == "tiny-blocks":
        if backend != "cpu":
            pytest.skip("the block size is a CPU fast-path parameter")
        from lorenza_kernels.cpu import projected_adam as cpu_impl

        monkeypatch.setattr(cpu_impl, "_BLOCK_BYTES", 16)
        monkeypatch.setattr(cpu_impl, "_ADAM_CHUNK", 7)
    shape, r = (37, 23), 5
    w, q, ma, va = _layer(shape, r, side, pdt, F32, pdt)
    seed, stream = random.getrandbits(64), random.getrandbits(32)
    for step in range(1, 4):
        g = torch.randn(shape).to(pdt)
        kw = dict(step=step, side=side, residual_scale=rs, **HYPER)
        wb, mb, vb, wb32, mb32, vb32 = _step_pair(backend, w, g, q, ma, va, seed, stream, **kw)
        wr, mr, vr, wr32, _, _ = _step_pair("reference", w, g, q, ma, va, seed, stream, **kw)
        msg = f"{backend}: seed={seed} stream={stream} step={step}"
        assert torch.equal(wb, _sr_of(wb32, pdt, seed, stream)), msg
        assert torch.equal(mb, mb32) and torch.equal(vb, vb32), msg
        same = wb32 == wr32
        assert same.float().mean().item() > 0.1, msg  # the comparison below must mean something
        assert torch.equal(wb[same], wr[same]), msg
        ulp = torch.finfo(pdt).eps * torch.maximum(wb.float().abs(), wr.float().abs()).clamp(min=2.0**-14)
        assert bool(((wb.float() - wr.float()).abs() <= ulp).all()), msg
        w, ma, va = wr, mr, vr  # the next step starts from the reference's state: no amplification


def test_cpu_rounding_without_the_extension(monkeypatch):
    """The CPU fast path needs no extension: without it each block of W is rounded by the
    reference's stochastic rounding, which gives the C++ kernel's bits (4-row blocks: offsets)."""
    from lorenza_kernels import _ext
    from lorenza_kernels.cpu import projected_adam as cpu_impl

    if _ext._C is None:
        pytest.skip("the extension is not built: nothing to compare with")
    monkeypatch.setattr(cpu_impl, "_BLOCK_BYTES", 16)
    w, q, ma, va = _layer((13, 11), 3, "right", F16, F32, F32)
    g = torch.randn(13, 11)
    a, b = [t.clone() for t in (w, ma, va)], [t.clone() for t in (w, ma, va)]
    kw = dict(step=2, side="right", rounding_seed=(1 << 63) + 9, rounding_stream=4, **HYPER)
    with lk.use_backend("cpu"):
        lk.projected_adam_step_(a[0], g, q, a[1], a[2], **kw)
        monkeypatch.setattr(_ext, "_C", None)
        lk.projected_adam_step_(b[0], g, q, b[1], b[2], **kw)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", ROUNDING_BACKENDS)
def test_rounding_leaves_float32_params_alone(backend):
    require_backend(OP, backend, "cpu")
    w, q, ma, va = _layer((12, 9), 3, "right")
    g = torch.randn(12, 9)
    a, b = [t.clone() for t in (w, ma, va)], [t.clone() for t in (w, ma, va)]
    with lk.use_backend(backend):
        lk.projected_adam_step_(a[0], g, q, a[1], a[2], step=1, side="right", rounding_seed=5, rounding_stream=1,
                                **HYPER)  # fmt: skip
        lk.projected_adam_step_(b[0], g, q, b[1], b[2], step=1, side="right", **HYPER)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("backend", ROUNDING_BACKENDS)
@pytest.mark.parametrize("side", SIDES)
def test_rounding_batched_streams(backend, side):
    """Layer l of a batch is rounded with rounding_streams[l] (repeats allowed), exactly as alone;
    stacked tensors too (views at offsets into one storage)."""
    require_backend(OP, backend, "cpu")
    layers = [_layer((10, 2, 8), 3, side, BF16, F32, F32) for _ in range(3)]
    grads = [torch.randn(10, 2, 8).to(BF16) for _ in layers]
    steps, streams, seed = [1, 4, 2], [9, 2, 9], random.getrandbits(64)
    kw = dict(side=side, residual_scale=0.5, **HYPER)
    alone = [[t.clone() for t in layer] for layer in layers]
    with lk.use_backend(backend):
        for (w, q, ma, va), g, s, st in zip(alone, grads, steps, streams):
            lk.projected_adam_step_(w, g, q, ma, va, step=s, rounding_seed=seed, rounding_stream=st, **kw)
        listed = [[t.clone() for t in layer] for layer in layers]
        ws, qs, mas, vas = (list(x) for x in zip(*listed))
        lk.projected_adam_step_batched_(ws, grads, qs, mas, vas, step=steps, rounding_seed=seed,
                                        rounding_streams=streams, **kw)  # fmt: skip
        stacked = [torch.stack([layer[k] for layer in layers]) for k in range(4)]
        lk.projected_adam_step_batched_(stacked[0], torch.stack(grads), *stacked[1:], step=steps, rounding_seed=seed,
                                        rounding_streams=streams, **kw)  # fmt: skip
    for i, want in enumerate(alone):
        assert torch.equal(listed[i][0], want[0]), f"layer {i}, seed={seed}"
        # stacked views: BLAS blocking may differ (alignment), so the float32 value may too
        torch.testing.assert_close(stacked[0][i].float(), want[0].float(), atol=1e-2, rtol=2**-7)
    # two layers with the same values and different streams round differently somewhere
    a, b = [t.clone() for t in layers[0]], [t.clone() for t in layers[0]]
    with lk.use_backend(backend):
        lk.projected_adam_step_batched_([a[0], b[0]], [grads[0], grads[0].clone()], [a[1], b[1]], [a[2], b[2]],
                                        [a[3], b[3]], step=1, rounding_seed=seed, rounding_streams=[0, 1],
                                        **kw)  # fmt: skip
    assert not torch.equal(a[0], b[0])


def _tiny_lr_run(backend, w, g, q, ma, va, steps, side, lr, rounding_seed=None, record=False):
    """``steps`` steps with a fixed gradient; returns the sum over steps of |W(t+1) - W(t)| if asked."""
    moved = torch.zeros(w.shape, dtype=torch.float64) if record else None
    kw = dict(lr=lr, beta1=0.9, beta2=0.99, eps=1e-8, side=side)
    with lk.use_backend(backend):
        for step in range(1, steps + 1):
            before = w.double() if record else None
            rounding = {} if rounding_seed is None else dict(rounding_seed=(rounding_seed + step) % 2**64,
                                                             rounding_stream=3)  # fmt: skip
            lk.projected_adam_step_(w, g, q, ma, va, step=step, **rounding, **kw)
            if record:
                moved += (w.double() - before).abs()
    return moved


@pytest.mark.parametrize("pdt", [BF16, F16], ids=dtype_id)
@pytest.mark.parametrize("backend", ROUNDING_BACKENDS)
def test_tiny_lr_rounding_follows_float32_over_thousands_of_steps(backend, pdt):
    """A 24 x 16 parameter with entries of magnitude in [1.25, 1.75), a fixed gradient and a tiny lr
    (1e-4, for bfloat16 raised to 2.5e-4 over fewer steps): every step moves W by at most a few
    1e-4, far below half an ulp (2^-8 in bfloat16, 2^-11 in float16), for 5000 steps (reference
    2000, Triton interpreter 1000).

    - Round to nearest stalls: W never changes (over 200 steps, 50 under the Triton interpreter;
      each step then recomputes the same values from the same W, with moments that do not depend
      on W).
    - Stochastic rounding follows the float32 run (the same steps on a float32 copy; Adam's update
      does not depend on W here, wd = 0): at each step W is on the grid and the rounding error has
      mean 0 and variance frac (1 - frac) ulp^2 <= |step| ulp, so over the run
      Var[W_sr - W_f32] <= ulp sum_t |step_t| (measured on the float32 run). The mean error over the
      384 elements is within 5 of its standard deviations, every element within 6 of its own, and
      each element's total change correlates with the float32 one.
    """
    require_backend(OP, backend, "cpu")
    steps = {"reference": 2000, "triton": 1000}.get(backend, 5000)
    lr = 1e-4 * max(1.0, 2500 / steps) if pdt == BF16 else 1e-4  # a drift of 10 ulps or more
    side = "left" if pdt == BF16 else "right"
    m, n, r = 24, 16, 4
    gen = torch.Generator().manual_seed(random.getrandbits(31))
    sign = torch.where(torch.rand(m, n, generator=gen) < 0.5, -1.0, 1.0)
    w0 = (sign * (1.25 + 0.5 * torch.rand(m, n, generator=gen))).to(pdt)
    g = torch.randn(m, n, generator=gen)
    q = torch.linalg.qr(torch.randn(m if side == "left" else n, r, generator=gen, dtype=torch.float64))[0].float()
    mshape = (r, n) if side == "left" else (m, r)
    w_sr, w_f32, w_rne = w0.clone(), w0.float(), w0.clone()
    seed = random.getrandbits(64)
    _tiny_lr_run(backend, w_sr, g, q, torch.zeros(mshape), torch.zeros(mshape), steps, side, lr, rounding_seed=seed)
    # the float32 trajectory and the size of its steps: on the CPU backend (BLAS; any backend's float32
    # value agrees to float32 rounding, far below the bfloat16/float16 ulps compared here)
    path = _tiny_lr_run("cpu", w_f32, g, q, torch.zeros(mshape), torch.zeros(mshape), steps, side, lr, record=True)
    _tiny_lr_run(backend, w_rne, g, q, torch.zeros(mshape), torch.zeros(mshape), 50 if steps < 2000 else 200, side, lr)
    assert torch.equal(w_rne, w0), "round to nearest must lose every update below half an ulp"
    ulp = torch.finfo(pdt).eps  # the ulp of [1, 2), where every entry stays
    drift = w_f32.double() - w0.double()
    assert drift.abs().mean().item() > 5 * ulp, "the float32 run must move by several ulps"
    err = w_sr.double() - w_f32.double()
    var = ulp * path  # per element
    msg = f"{backend} {pdt}: seed={seed}, mean error {err.mean().item():.3g}"
    assert abs(err.mean().item()) <= 5 * math.sqrt(var.sum().item()) / err.numel(), msg
    assert bool((err.abs() <= 6 * var.sqrt() + 1e-12).all()), msg
    moved = w_sr.double() - w0.double()
    assert torch.corrcoef(torch.stack([moved.reshape(-1), drift.reshape(-1)]))[0, 1].item() > 0.8, msg


def test_rounding_opcheck_and_compile():
    layers = [_layer((6, 5), 2, "left", BF16) for _ in range(2)]
    ws, qs, mas, vas = (list(x) for x in zip(*layers))
    grads = [torch.randn(6, 5).to(BF16) for _ in layers]
    args = (ws, grads, qs, mas, vas, [1, 3], 0.1, 0.9, 0.999, 1e-8, 0.01, 0.25, "left", 0.5, -77, [3, 2**32 - 1])
    torch.library.opcheck(torch.ops.lorenza_kernels.projected_adam_step_.default, args)

    def step(w, g, q, m, v):
        torch.ops.lorenza_kernels.projected_adam_step_([w], [g], [q], [m], [v], [1], 1e-2, 0.9, 0.999, 1e-8, 0.0,
                                                        1.0, "right", 0.0, 12345, [7])  # fmt: skip
        return w.float().sum()

    def fresh():
        torch.manual_seed(0)
        q = torch.linalg.qr(torch.randn(6, 3))[0]
        return torch.randn(8, 6).to(BF16), torch.randn(8, 6), q, torch.zeros(8, 3), torch.zeros(8, 3)

    eager, compiled = fresh(), fresh()
    want = step(*eager)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*compiled)
    torch.testing.assert_close(got, want)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "override,needle",
    [
        (dict(rounding_seed=1), "rounding_seed, rounding_stream"),
        (dict(rounding_stream=1), "rounding_seed, rounding_stream"),
        (dict(rounding_seed=1 << 64, rounding_stream=1), "rounding_seed"),
        (dict(rounding_seed=-1, rounding_stream=1), "rounding_seed"),
        (dict(rounding_seed=1, rounding_stream=1 << 32), "rounding_stream"),
        (dict(rounding_seed=1, rounding_stream=1.5), "rounding_stream"),
    ],
)
def test_bad_rounding_arguments_raise_and_leave_everything_untouched(override, needle):
    kwargs = _valid()
    kwargs["param"] = kwargs["param"].to(BF16)
    kwargs.update(override)
    before = {k: v.clone() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    with pytest.raises((ValueError, TypeError), match=needle):
        lk.projected_adam_step_(**kwargs)
    for k, v in before.items():
        assert torch.equal(kwargs[k], v)


@pytest.mark.parametrize("backend", ROUNDING_BACKENDS)
def test_bad_rounding_arguments_direct_and_batched(backend):
    require_backend(OP, backend, "cpu")
    w, q, ma, va = _layer((8, 6), 3, "left", BF16)
    g = torch.randn(8, 6)
    before = w.clone()
    base = ([w], [g], [q], [ma], [va], [1], 0.1, 0.9, 0.999, 1e-8, 0.0, 1.0, "left", 0.0)
    op = torch.ops.lorenza_kernels.projected_adam_step_
    with lk.use_backend(backend):
        for extra, needle in [((5, None), "give both"), ((None, [1]), "give both"), ((5, [1, 2]), "rounding_streams"),
                              ((5, [-1]), r"rounding_streams\[0\]")]:  # fmt: skip
            with pytest.raises(ValueError, match=needle):
                op(*base, *extra)
        with pytest.raises(ValueError, match="rounding_streams"):
            lk.projected_adam_step_batched_([w], [g], [q], [ma], [va], step=1, lr=0.1, side="left", rounding_seed=3,
                                            rounding_streams=[1, 2])  # fmt: skip
        with pytest.raises(TypeError, match="rounding_streams"):
            lk.projected_adam_step_batched_([w], [g], [q], [ma], [va], step=1, lr=0.1, side="left", rounding_seed=3,
                                            rounding_streams=4)  # fmt: skip
    assert torch.equal(w, before)
