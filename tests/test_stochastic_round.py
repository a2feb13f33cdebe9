"""Stochastic rounding from the rounding stream (docs/rng.md, "The rounding stream"): the definition
against an exact oracle, ``stochastic_round_`` bitwise across backends, ``seeded_axpby_`` with a
rounding seed, unbiasedness, long accumulations of updates far below half an ulp, and the
torch.library contract (opcheck, compile, validation, version counters).

Inputs and seeds are fresh random draws on every run; failures print them. The statistical tests
use 5-sigma bounds (a false failure about once in 10^6 runs).
"""

from __future__ import annotations

import math
import random
import struct
from fractions import Fraction

import pytest
import torch
from conftest import BACKENDS, TRITON_INTERPRET, dtype_id, poison_, require_backend

import lorenza_kernels as lk
from lorenza_kernels.reference.rng import rounding_words, stochastic_round

LOW = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (0,), (1,), (3,), (5,), (4, 0), (7, 13), (5, 123, 123), (3, 2, 5, 7)]
#: (fraction bits p, e_min, largest finite) of docs/rng.md's definition
FORMAT = {torch.bfloat16: (7, -126, 3.3895313892515355e38), torch.float16: (10, -14, 65504.0)}
MASK32 = 0xFFFFFFFF


def _seed() -> int:
    return random.getrandbits(64)


def _stream() -> int:
    return random.getrandbits(32)


def _run(backend, fn, *args, **kwargs):
    with lk.use_backend(backend):
        return fn(*args, **kwargs)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bits as integers (NaN payloads are not part of any contract: all NaNs map to -1)."""
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype]
    b = t.detach().cpu().contiguous().view(view).to(torch.int64)
    return torch.where(torch.isnan(t.detach().cpu().float()), -1, b)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


# --- the definition, evaluated exactly ------------------------------------------------------------


def _philox(counter, key):
    """Philox4x32-10 on Python ints, written from docs/rng.md (independent of the torch reference)."""
    c, (k0, k1) = list(counter), key
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
        p0, p1 = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k0, p1 & MASK32, (p0 >> 32) ^ c[3] ^ k1, p0 & MASK32]
    return c


def _word(i: int, seed: int, stream: int) -> int:
    b = i >> 2
    return _philox((b & MASK32, b >> 32, stream, 1), (seed & MASK32, seed >> 32))[i & 3]


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits & MASK32))[0]


def _oracle(v: float, x: int, dtype: torch.dtype) -> float:
    """docs/rng.md's definition with exact rationals: SR(v) for the float32 v and the word x."""
    p, e_min, big = FORMAT[dtype]
    if math.isnan(v) or math.isinf(v) or abs(v) >= big or (dtype == torch.bfloat16 and abs(v) < 2.0**-126):
        return torch.tensor([v], dtype=torch.float32).to(dtype).item()  # round to nearest even
    e = ((struct.unpack("<I", struct.pack("<f", v))[0] >> 23) & 0xFF) - 127
    ulp = Fraction(2) ** (max(e, e_min) - p)
    q = Fraction(v) / ulp
    fl = math.floor(q)
    r = fl + (1 if Fraction(x >> 9, 1 << 23) < q - fl else 0)
    return math.copysign(float(r * ulp), v)


def _frac_x23(v: float, dtype: torch.dtype) -> Fraction:
    """``frac * 2^23`` of the definition (the threshold of ``x >> 9``)."""
    p, e_min, _ = FORMAT[dtype]
    e = ((struct.unpack("<I", struct.pack("<f", v))[0] >> 23) & 0xFF) - 127
    q = Fraction(v) / Fraction(2) ** (max(e, e_min) - p)
    return (q - math.floor(q)) * (1 << 23)


def _to_f32(v: float) -> float:
    return torch.tensor([v], dtype=torch.float32).item()


def _edge_values(dtype: torch.dtype) -> list[float]:
    """Values where rounding is delicate: powers of two and just below, midpoints, quarter points,
    float16 subnormals and below, float32 subnormals, zeros, the largest finite value and its
    neighbourhood, values below 2^-126 (round to nearest for bfloat16), NaN and Inf."""
    p, e_min, big = FORMAT[dtype]
    vals = [0.0, -0.0, float("inf"), float("-inf"), float("nan"), big, -big, 2.0**-149, -(2.0**-149), 2.0**-126]
    for e in [*range(e_min - p - 3, e_min + 3), -1, 0, 1, 7, 15, *([126, 127] if dtype == torch.bfloat16 else [])]:
        two = 2.0**e
        ulp = 2.0 ** (max(e, e_min) - p)
        for x in (two, two * (1 - 2.0**-24), two + ulp / 2, two + ulp / 4, two + 3 * ulp / 4, two + ulp * 2.0**-14):
            vals += [x, -x]
    below_big = _f32(struct.unpack("<I", struct.pack("<f", big))[0] - 1)
    vals += [below_big, -below_big, big * (1 - 2.0**-12), 2.0**-24 * 0.75, 2.0**-24 * 1.5, 2.0**-25, 2.0**-40]
    return [_to_f32(v) for v in vals]


def test_rounding_words_known_answers():
    """docs/rng.md's table, and the torch reference against the plain-Python evaluation."""
    known = {
        (0, 0): "2dce73e5 1348e23f fcf8e0ec a287aadb e9535be3 510c4549 63517a4d 9a6323a7",
        (1099511627783, 3): "fa568f39 22a4830b 27022942 77b19089 90c37498 245e2215 578fe88d 71b0d96d",
        (2**64 - 1, 2**32 - 1): "6518d848 5e8e9907 95e25603 b823c213 b4035cce 8b2b14a1 6cd17766 4623ebb6",
    }
    for (seed, stream), words in known.items():
        want = [int(w, 16) for w in words.split()]
        assert rounding_words(0, 8, seed, stream).tolist() == want
        assert [_word(i, seed, stream) for i in range(8)] == want
    # block index >= 2^32, and ranges that start and end inside a block
    want = [int(w, 16) for w in "b5c2ea45 06e91e1b 1a2efc11 dab3b1b5 791fccb2 9f9962d6 f963145b 82c93d25".split()]
    assert rounding_words(2**34, 2**34 + 8, 1, 2).tolist() == want
    seed, stream = _seed(), _stream()
    whole = rounding_words(0, 103, seed, stream)
    for a, b in [(1, 4), (3, 9), (5, 103), (101, 103)]:
        assert torch.equal(rounding_words(a, b, seed, stream), whole[a:b])
    assert [_word(i, seed, stream) for i in (0, 5, 102)] == whole[[0, 5, 102]].tolist(), f"seed={seed}"
    # the Gaussian stream (c3 = 0) and the rounding stream (c3 = 1) are different words
    assert _philox((0, 0, stream, 0), (seed & MASK32, seed >> 32))[0] != whole[0].item()


def test_rounding_known_answers():
    """docs/rng.md: seed 0, stream 0, elements 0..7, two values each."""
    words = rounding_words(0, 8, 0, 0)
    table = {
        (1 + 2**-10, torch.bfloat16): [1.0, 1.0078125, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        (-(1 + 2**-10), torch.bfloat16): [-1.0, -1.0, -1.0078125, -1.0, -1.0078125, -1.0, -1.0, -1.0],
        (3 * 2**-26, torch.float16): [2.0**-24, 2.0**-24, 0.0, 2.0**-24, 0.0, 2.0**-24, 2.0**-24, 2.0**-24],
    }
    for (v, dtype), want in table.items():
        assert stochastic_round(torch.full((8,), v), words, dtype).float().tolist() == want
        assert [_oracle(v, w, dtype) for w in words.tolist()] == want


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_definition_against_exact_oracle(dtype):
    """The reference (float64 steps) against exact rationals: edge values with words at and around
    the threshold ``x >> 9 = ceil(frac 2^23)`` (where the decision flips), 0 and the largest word;
    then random float32 bit patterns biased to the delicate exponent fields, with random words."""
    vals, words = [], []
    for v in _edge_values(dtype):
        cand = [0, MASK32, random.getrandbits(32)]
        if math.isfinite(v):
            t = math.ceil(_frac_x23(v, dtype))
            cand += [max(t - 1, 0) << 9, min(t, (1 << 23) - 1) << 9, min(t + 1, (1 << 23) - 1) << 9]
        vals += [v] * len(cand)
        words += cand
    exps = [0, 1, 100, 101, 102, 103, 104, 112, 113, 114, 126, 127, 128, 141, 142, 143, 253, 254, 255]
    for _ in range(4000):
        b = random.getrandbits(32)
        if random.random() < 0.7:
            b = (b & 0x807FFFFF) | (random.choice(exps) << 23)
        vals.append(_f32(b))
        words.append(random.getrandbits(32))
    got = stochastic_round(torch.tensor(vals, dtype=torch.float32), torch.tensor(words), dtype).float().tolist()
    for v, x, g in zip(vals, words, got):
        want = _oracle(v, x, dtype)
        same = (math.isnan(want) and math.isnan(g)) or (want == g and math.copysign(1, want) == math.copysign(1, g))
        assert same, f"v={v!r} ({struct.unpack('<I', struct.pack('<f', v))[0]:08x}) x={x:08x}: {g!r} != {want!r}"


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_representable_values_stay_exact(dtype):
    """Every value of the dtype (all 2^16 bit patterns: normals, subnormals, +-0, Inf, NaN) is
    returned bit for bit, whatever the word."""
    t = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype)
    v = t.float()
    for x in (0, 1 << 9, MASK32, None):
        words = torch.randint(0, 1 << 32, v.shape) if x is None else torch.full(v.shape, x, dtype=torch.int64)
        assert _same_bits(stochastic_round(v, words, dtype), t)


@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_result_is_a_neighbour(dtype):
    """SR(v) is the value of the dtype just below or just above v (never further), for random v."""
    v = torch.randn(1 << 16) * torch.exp2(torch.randint(-30, 16, (1 << 16,)).float())
    v = v[v.abs() < FORMAT[dtype][2]]  # beyond the largest finite value: round to nearest (Inf)
    r = stochastic_round(v, torch.randint(0, 1 << 32, v.shape), dtype)
    rne = v.to(dtype)
    ulp = torch.exp2(torch.floor(torch.log2(v.abs())).clamp(min=FORMAT[dtype][1]) - FORMAT[dtype][0])
    assert bool(((r.float() - v).abs() < ulp).all())
    assert bool(((r.float() - rne.float()).abs() <= ulp).all())


# --- stochastic_round_: every backend, bitwise ----------------------------------------------------


def _source(shape, gen) -> torch.Tensor:
    """float32 values over many binades, with specials sprinkled in."""
    n = math.prod(shape)
    v = torch.randn(n, generator=gen) * torch.exp2(torch.randint(-30, 17, (n,), generator=gen).float())
    specials = torch.tensor([0.0, -0.0, float("nan"), float("inf"), -65504.0, 65519.0, 3e38, 1e-40, -1e-45, 2.0**-25])
    if n:
        idx = torch.randint(0, n, (min(n, 16),), generator=gen)
        v[idx] = specials[torch.randint(0, len(specials), (idx.numel(),), generator=gen)]
    return v.reshape(shape)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(random.getrandbits(31))


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_stochastic_round_matches_reference_bitwise(backend, dev, dtype, shape):
    require_backend("stochastic_round_", backend, dev)
    seed, stream = _seed(), _stream()
    src = _source(shape, _gen()).to(dev)
    ours = poison_(torch.empty(shape, dtype=dtype, device=dev))
    _run(backend, lk.stochastic_round_, [ours], [src], seed, first_stream=stream)
    want = stochastic_round(src.cpu().reshape(-1), rounding_words(0, src.numel(), seed, stream), dtype)
    assert _same_bits(ours.cpu(), want.reshape(shape)), f"seed={seed} stream={stream}"


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_stochastic_round_mixed_list(backend, dev):
    """One call, every dtype, empty tensors, any streams (repeats included): tensor k as alone."""
    require_backend("stochastic_round_", backend, dev)
    gen = _gen()
    specs = [((17,), torch.bfloat16), ((0, 3), torch.float16), ((3, 5), torch.float32), ((2, 130), torch.float16),
             ((1,), torch.bfloat16), ((65, 3), torch.bfloat16)]  # fmt: skip
    src = [_source(s, gen).to(dev) for s, _ in specs]
    dst = [poison_(torch.empty(s, dtype=d, device=dev)) for s, d in specs]
    streams = [9, 2, (1 << 32) - 1, 9, 0, 12345]
    seed = _seed()
    _run(backend, lk.stochastic_round_, dst, src, seed, streams=streams)
    for k, (d, x, s) in enumerate(zip(dst, src, streams)):
        alone = poison_(torch.empty_like(d))
        _run("reference", lk.stochastic_round_, [alone], [x], seed, first_stream=s)
        assert _same_bits(d, alone), f"tensor {k}, seed={seed}"


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_stochastic_round_random_bit_patterns(backend, dev):
    """2^16 (Triton interpreter: 2^12) random float32 bit patterns per dtype, bitwise."""
    require_backend("stochastic_round_", backend, dev)
    n = 1 << (12 if backend == "triton" else 16)
    bits = torch.randint(-(1 << 31), 1 << 31, (n,), dtype=torch.int64).to(torch.int32)
    exps = torch.tensor([0, 1, 101, 102, 103, 104, 112, 113, 126, 127, 142, 143, 254, 255], dtype=torch.int32)
    pick = torch.randint(0, len(exps), (n,))
    biased = (bits & torch.tensor(0x807FFFFF - (1 << 32), dtype=torch.int32)) | (exps[pick] << 23)
    src = torch.where(torch.rand(n) < 0.7, biased, bits).view(torch.float32)
    seed, stream = _seed(), _stream()
    for dtype in LOW:
        ours = torch.empty(n, dtype=dtype, device=dev)
        _run(backend, lk.stochastic_round_, [ours], [src.to(dev)], seed, first_stream=stream)
        assert _same_bits(ours.cpu(), stochastic_round(src, rounding_words(0, n, seed, stream), dtype)), seed


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("dtype", LOW, ids=dtype_id)
def test_stochastic_round_keeps_representable_values(backend, dev, dtype):
    """All 2^16 values of the dtype (normals, subnormals, +-0, +-Inf; NaN stays NaN) come back bit
    for bit, for two seeds."""
    require_backend("stochastic_round_", backend, dev)
    t = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(dtype).to(dev)
    for seed in (_seed(), 0):
        dst = poison_(torch.empty_like(t))
        _run(backend, lk.stochastic_round_, [dst], [t.float()], seed, first_stream=_stream())
        assert _same_bits(dst, t), f"seed={seed}"


# --- seeded_axpby_ with a rounding seed -----------------------------------------------------------


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_axpby_rounding_matches_reference(backend, dev, dtype, shape):
    """The backend's own float32 value v (the same call on a float32 copy: the arithmetic does not
    depend on the storage dtype), rounded by the reference's definition, is bitwise what the
    backend stores; against the reference backend's run (whose v may differ in the last float32
    bits), at most one ulp apart on a tiny fraction of the elements."""
    require_backend("seeded_axpby_", backend, dev)
    gen = _gen()
    t0 = (torch.randn(shape, generator=gen) * 3).to(dtype).to(dev)
    seed, rseed, stream = _seed(), _seed(), _stream()
    alpha, beta = random.uniform(-1e-3, 1e-3), random.choice([1.0, 0.9, 0.0])
    ours, v = t0.clone(), t0.to(torch.float32, copy=True)
    norms = _run(backend, lk.seeded_axpby_, [ours], seed, alpha, beta, first_stream=stream, rounding_seed=rseed)
    norms_v = _run(backend, lk.seeded_axpby_, [v], seed, alpha, beta, first_stream=stream)
    assert torch.equal(norms, norms_v)
    msg = f"seed={seed} rseed={rseed} stream={stream}"
    want = stochastic_round(v.cpu().reshape(-1), rounding_words(0, v.numel(), rseed, stream), dtype).reshape(shape)
    assert _same_bits(ours.cpu(), want), msg
    ref = t0.clone()
    _run("reference", lk.seeded_axpby_, [ref], seed, alpha, beta, first_stream=stream, rounding_seed=rseed)
    if dtype == torch.float32:
        assert torch.equal(ours, v)  # float32 tensors are never rounded stochastically
        return
    diff = (ours.float() - ref.float()).abs().cpu()
    ulp = torch.finfo(dtype).eps * torch.maximum(ours.float().abs(), ref.float().abs()).cpu().clamp(min=2.0**-14)
    assert bool((diff <= ulp).all()), msg
    assert int((diff != 0).sum()) <= max(2, ours.numel() // 100), msg


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_axpby_rounding_with_rank_one_term_and_mixed_list(backend, dev):
    require_backend("seeded_axpby_", backend, dev)
    gen = _gen()
    specs = [((3, 7), torch.bfloat16), ((130,), torch.float16), ((4, 5), torch.float32), ((2, 3, 4), torch.bfloat16)]
    ts = [torch.randn(s, generator=gen).to(d).to(dev) for s, d in specs]
    rows = [torch.randn(lk.matrix_dims(t)[1], generator=gen).to(dev) for t in ts]
    vs = [t.to(torch.float32, copy=True) for t in ts]
    seed, rseed = _seed(), _seed()
    kw = dict(first_stream=40, row_vectors=rows, gamma=[1e-3, -2e-3, 0.5, 1e-4])
    _run(backend, lk.seeded_axpby_, ts, seed, 1e-3, 1.0, rounding_seed=rseed, **kw)
    _run(backend, lk.seeded_axpby_, vs, seed, 1e-3, 1.0, **kw)
    for k, (t, v) in enumerate(zip(ts, vs)):
        want = stochastic_round(v.cpu().reshape(-1), rounding_words(0, v.numel(), rseed, 40 + k), t.dtype)
        assert _same_bits(t.cpu(), want.reshape(t.shape)), f"tensor {k}: seed={seed} rseed={rseed}"


# --- unbiasedness and long accumulations ----------------------------------------------------------

FAST = [pytest.param("reference", id="reference"), pytest.param("cpu", id="cpu"),
        pytest.param("triton", id="triton-interp", marks=pytest.mark.triton_interpret)]  # fmt: skip


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize(
    "dtype,value",
    [
        (torch.bfloat16, 1 + 2**-10),
        (torch.bfloat16, -(1 + 2**-10)),
        (torch.bfloat16, 2 - 2**-12),
        (torch.bfloat16, 2.0**-100 * (1 + 2**-9)),
        (torch.float16, 1 + 2**-13),
        (torch.float16, -1.3e-6),
        (torch.float16, 2.0**-26),
        (torch.float16, 1000.3),
    ],  # fmt: skip
    ids=lambda x: dtype_id(x) if isinstance(x, torch.dtype) else f"{x:.4g}",
)
def test_unbiased_over_seeds(backend, dtype, value):
    """The mean of SR(v) over 32 seeds x 2048 elements is v within 5 standard errors; round to
    nearest is off by the whole rounding error (v = 1 + 2^-10 in bfloat16 always gives 1.0)."""
    require_backend("stochastic_round_", backend, "cpu")
    n, seeds = 2048, [_seed() for _ in range(32)]
    src = torch.full((n,), value)
    v = src[0].item()  # the float32 value
    # its two neighbours a < v < b in the dtype: frac = (v - a) / (b - a), variance frac (1 - frac) (b - a)^2
    a = math.floor(Fraction(v) / _ulp(v, dtype)) * _ulp(v, dtype)
    b = a + _ulp(v, dtype)
    frac = float((Fraction(v) - a) / (b - a))
    total = 0.0
    for s in seeds:
        dst = torch.empty(n, dtype=dtype)
        _run(backend, lk.stochastic_round_, [dst], [src], s)
        assert bool(((dst.double() == float(a)) | (dst.double() == float(b))).all()), f"seed={s}"
        total += dst.double().sum().item()
    mean, count = total / (n * len(seeds)), n * len(seeds)
    se = math.sqrt(frac * (1 - frac) / count) * float(b - a)
    assert abs(mean - v) <= 5 * se, f"{backend}: mean {mean!r} vs v {v!r} (se {se:.3g}), seeds {seeds[:2]}"
    rne_err = abs(src.to(dtype).double()[0].item() - v)
    assert rne_err > 10 * se, "the test value must be one that round to nearest gets visibly wrong"


def _ulp(v: float, dtype: torch.dtype) -> Fraction:
    p, e_min, _ = FORMAT[dtype]
    e = ((struct.unpack("<I", struct.pack("<f", v))[0] >> 23) & 0xFF) - 127
    return Fraction(2) ** (max(e, e_min) - p)


#: Steps of every long test of a low-precision write (the project rule: thousands of steps, not one).
#: Per call the pure-torch reference costs about 1 ms per tensor and the Triton interpreter 15-40 ms
#: per launch, whatever the size: 2000 and 1000 steps there.
STEPS = 5000


def long_run(backend: str) -> tuple[int, int]:
    """(steps, elements) of the long tests on ``backend``."""
    if backend == "triton" and TRITON_INTERPRET:
        return 1000, 256
    return (2000 if backend == "reference" else STEPS), 1024


@pytest.mark.parametrize("backend", FAST)
def test_axpby_accumulates_updates_below_half_an_ulp(backend):
    """``steps`` steps of ``t <- t + d`` with seeded_axpby_ on a bfloat16 and a float16 tensor in one
    call (alpha = 0; the rank-one term adds d to every element), d = f ulp with f = 1/64 (bfloat16)
    or 1/16 (float16), so that t stays in [1, 2) (one ulp throughout) and ``t + d`` is exact in
    float32:

    - round to nearest never moves: t stays 1.0 (checked over 200 steps, 50 under the Triton
      interpreter: every step recomputes the same value from the same t, so it never will);
    - stochastic rounding tracks the exact sum 1 + steps d: t is on the grid before every step, so
      each step adds an error e_s with E[e_s] = 0 and Var[e_s] = f (1 - f) ulp^2, independent across
      steps and elements (distinct rounding words). Over n elements the mean of t - (1 + steps d)
      has the standard deviation ulp sqrt(steps f (1 - f) / n); the bound is 5 of those, and the
      empirical variance across elements must match steps f (1 - f) ulp^2 within 6 standard errors
      of a variance estimate (relative sqrt(2 / n)).
    """
    require_backend("seeded_axpby_", backend, "cpu")
    steps, n = long_run(backend)
    ulps = [2.0 ** -FORMAT[dt][0] for dt in LOW]
    fs = [1 / 64, 1 / 16]
    gamma = [f * u for f, u in zip(fs, ulps)]
    rows = [torch.ones(n), torch.ones(n)]
    t_sr, t_rne = [torch.ones(n, dtype=dt) for dt in LOW], [torch.ones(n, dtype=dt) for dt in LOW]
    base = _seed()
    with lk.use_backend(backend):
        for step in range(steps):
            lk.seeded_axpby_(t_sr, 7, 0.0, 1.0, row_vectors=rows, gamma=gamma, rounding_seed=(base + step) % 2**64)
        for _ in range(200 if steps >= 2000 else 50):
            lk.seeded_axpby_(t_rne, 7, 0.0, 1.0, row_vectors=rows, gamma=gamma)
    for t, r, dt, ulp, f, d in zip(t_sr, t_rne, LOW, ulps, fs, gamma):
        assert bool((r == 1.0).all()), "round to nearest must lose every update below half an ulp"
        err = t.double() - (1.0 + steps * d)
        var = steps * f * (1 - f) * ulp**2
        bound = 5 * math.sqrt(var / n)
        msg = f"{backend} {dt}: base seed {base}, mean error {err.mean().item():.3g} (bound {bound:.3g})"
        assert abs(err.mean().item()) <= bound, msg
        assert abs(err.var().item() / var - 1) <= 6 * math.sqrt(2 / n), msg
        assert bool((t.double() < 2.0).all()) and bool((t.double() >= 1.0).all()), msg


@pytest.mark.parametrize("backend", FAST)
def test_write_back_accumulates_updates_below_half_an_ulp(backend):
    """The optimizers' pattern: a low-precision parameter p (bfloat16 and float16, one call), its
    float32 image updated by a tiny step, written back with stochastic_round_ (a fresh rounding
    seed per step), ``steps`` times. Per-element updates delta_i of both signs,
    |delta_i| <= 4 ulp / steps, so every element stays in [1, 2) and p + delta_i rounds in float32
    to p + delta'_i (delta_i on the 2^-23 grid) for every p there: the exact target is
    p0 + steps delta'_i. p is on the dtype's grid before each step, so a step adds an error of
    variance frac_i (1 - frac_i) ulp^2 <= |delta'_i| ulp; the mean error over the elements is
    bounded by 5 of its standard deviations, and each element's change correlates with its target.
    """
    require_backend("stochastic_round_", backend, "cpu")
    steps, n = long_run(backend)
    gen = _gen()
    ulps = [2.0 ** -FORMAT[dt][0] for dt in LOW]
    p0 = [(1.25 + 0.5 * torch.rand(n, generator=gen)).to(dt) for dt in LOW]  # one ulp for the whole run
    delta = [((torch.rand(n, generator=gen) - 0.5) * 8 * u / steps).float() for u in ulps]
    exact_steps = [((p.float() + d) - p.float()).double() for p, d in zip(p0, delta)]  # delta' (p in [1, 2))
    p_sr, p_rne, base = [p.clone() for p in p0], [p.clone() for p in p0], _seed()
    with lk.use_backend(backend):
        for step in range(steps):
            lk.stochastic_round_(p_sr, [p.float() + d for p, d in zip(p_sr, delta)], (base + step) % 2**64)
    for _ in range(200):
        for p, d in zip(p_rne, delta):
            p.copy_(p.float() + d)
    for p, r, q0, dt, ulp, ds in zip(p_sr, p_rne, p0, LOW, ulps, exact_steps):
        assert torch.equal(r, q0), "round to nearest must lose every update below half an ulp"
        want = steps * ds
        err = p.double() - q0.double() - want
        bound = 5 * math.sqrt(steps * (ds.abs() * ulp).sum().item()) / n
        msg = f"{backend} {dt}: base seed {base}, mean error {err.mean().item():.3g} (bound {bound:.3g})"
        assert abs(err.mean().item()) <= bound, msg
        moved = p.double() - q0.double()
        assert torch.corrcoef(torch.stack([moved, want]))[0, 1].item() > 0.5, msg


# --- determinism ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_same_seed_same_bits_other_seed_other_bits(backend, dev):
    require_backend("stochastic_round_", backend, dev)
    src = torch.randn(4099, device=dev) * 1e-3 + 1.0
    outs = []
    for seed in (11, 11, 12):
        dst = torch.empty(4099, dtype=torch.bfloat16, device=dev)
        _run(backend, lk.stochastic_round_, [dst], [src], seed, first_stream=5)
        outs.append(dst)
    assert _same_bits(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])
    # the stream matters too, and the rounding stream is not the Gaussian one reused
    other = torch.empty(4099, dtype=torch.bfloat16, device=dev)
    _run(backend, lk.stochastic_round_, [other], [src], 11, first_stream=6)
    assert not torch.equal(outs[0], other)


# --- the torch.library contract -------------------------------------------------------------------


def test_opcheck():
    src = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 2)]
    dst = [torch.empty(3, 5, dtype=torch.bfloat16), torch.empty(7, dtype=torch.float16), torch.empty(2, 2)]
    torch.library.opcheck(torch.ops.lorenza_kernels.stochastic_round_.default, (dst, src, -5, [3, 4, 0]))
    ts = [torch.randn(3, 5).to(torch.bfloat16), torch.randn(7)]
    axpby = torch.ops.lorenza_kernels.seeded_axpby_.default
    torch.library.opcheck(axpby, (ts, 5, [3, 4], [0.5, 1.0], [1.0, 0.0], None, None, -9))
    rows = [torch.randn(5), torch.randn(7)]
    torch.library.opcheck(axpby, (ts, 5, [3, 4], [0.5, 1.0], [1.0, 0.5], rows, [0.1, 0.2], 123))


def test_meta_device():
    d, s = torch.empty(4, 6, dtype=torch.bfloat16, device="meta"), torch.empty(4, 6, device="meta")
    lk.stochastic_round_([d], [s], 1)
    assert lk.seeded_axpby_([d], 1, 0.5, rounding_seed=3).device.type == "meta"


def test_compiles_fullgraph():
    def f(w, w32, t):
        torch.ops.lorenza_kernels.stochastic_round_([w], [w32], 3, [0])
        norms = torch.ops.lorenza_kernels.seeded_axpby_([t], 3, [1], [1e-3], [1.0], None, None, 77)
        return norms.sum() + w.float().sum() + t.float().sum()

    def fresh():
        torch.manual_seed(0)
        return torch.empty(4, 5, dtype=torch.bfloat16), torch.randn(4, 5), torch.randn(9).to(torch.float16)

    eager, compiled = fresh(), fresh()
    want = f(*eager)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(*compiled)
    torch.testing.assert_close(got, want)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_version_counter_is_bumped():
    dst, src = torch.empty(5, dtype=torch.bfloat16), torch.randn(5)
    v = dst._version
    lk.stochastic_round_([dst], [src], 1)
    assert dst._version > v
    t = torch.zeros(5, dtype=torch.bfloat16)
    v = t._version
    lk.seeded_axpby_([t], 1, 1.0, rounding_seed=2)
    assert t._version > v


def _bad_public_calls():
    d, s = torch.zeros(4, 3, dtype=torch.bfloat16), torch.randn(4, 3)  # zeros: compared after the call
    big = torch.randn(20)
    return [
        ("int dst", [torch.zeros(3, dtype=torch.int32)], [torch.randn(3)], {}, "dst\\[0\\]"),
        ("float64 dst", [torch.zeros(3, dtype=torch.float64)], [torch.randn(3)], {}, "dst\\[0\\]"),
        ("half src", [d], [s.half()], {}, "src\\[0\\]"),
        ("src shape", [d], [torch.randn(3, 4)], {}, "src\\[0\\]"),
        ("src device", [d], [torch.randn(4, 3, device="meta")], {}, "src\\[0\\]"),
        ("src count", [d], [s, s], {}, "src"),
        ("dst non-contiguous", [torch.zeros(3, 4, dtype=torch.bfloat16).t()], [torch.randn(4, 3)], {}, "dst\\[0\\]"),
        ("src non-contiguous", [d], [torch.randn(3, 4).t()], {}, "src\\[0\\]"),
        ("dst twice", [d, d], [s, s.clone()], {}, "share memory"),
        ("dst overlaps src", [big[:5]], [big[3:8]], {}, "share memory"),
        ("dst is src", [s], [s], {}, "share memory"),
        ("streams length", [d], [s], {"streams": [1, 2]}, "streams"),
        ("stream range", [d], [s], {"streams": [1 << 32]}, "streams\\[0\\]"),
        ("first_stream", [d], [s], {"first_stream": -1}, "first_stream"),
        ("seed range", [d], [s], {"seed": 1 << 64}, "seed"),
        ("negative seed", [d], [s], {"seed": -1}, "seed"),
        ("not a list", d, [s], {}, "dst"),
    ]


@pytest.mark.parametrize("name,dst,src,kwargs,match", _bad_public_calls(), ids=[c[0] for c in _bad_public_calls()])
def test_bad_input_raises_and_changes_nothing(name, dst, src, kwargs, match):
    args = {"seed": 3, **kwargs}
    items = dst if isinstance(dst, list) else [dst]
    before = [t.clone() for t in items if t.device.type != "meta"]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        lk.stochastic_round_(dst, src, args.pop("seed"), **args)
    assert all(torch.equal(t, b) for t, b in zip([t for t in items if t.device.type != "meta"], before))


def test_requires_grad_outside_no_grad():
    p = torch.nn.Parameter(torch.randn(3).to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="no_grad"):
        lk.stochastic_round_([p], [torch.randn(3)], 1)
    with torch.no_grad():
        lk.stochastic_round_([p], [torch.randn(3)], 1)


def test_axpby_rounding_seed_errors():
    t = torch.randn(4).to(torch.bfloat16)
    before = t.clone()
    for bad, exc in ((-1, ValueError), (1 << 64, ValueError), (1.5, TypeError), ("1", TypeError)):
        with pytest.raises(exc, match="rounding_seed"):
            lk.seeded_axpby_([t], 1, 0.5, rounding_seed=bad)
    assert torch.equal(t, before)


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_direct_op_calls_get_the_same_errors(backend, dev):
    require_backend("stochastic_round_", backend, dev)
    d, s = torch.zeros(4, 6, dtype=torch.bfloat16, device=dev), torch.randn(4, 6, device=dev)
    big = torch.randn(30, device=dev)
    cases = [
        ("float16 src", ([d], [s.half()], 1, [0]), TypeError, "src\\[0\\]"),
        ("src shape", ([d], [s.view(6, 4)], 1, [0]), ValueError, "src\\[0\\]"),
        ("non-contiguous src", ([d.view(6, 4)], [s.t()], 1, [0]), ValueError, "contiguous"),
        ("overlap", ([big[:10], big[5:12]], [big[12:22], big[22:29]], 1, [0, 1]), ValueError, "share memory"),
        ("dst over src", ([big[:10]], [big[5:15]], 1, [0]), ValueError, "share memory"),
        ("streams", ([d], [s], 1, [0, 1]), ValueError, "streams"),
        ("stream range", ([d], [s], 1, [-1]), ValueError, "streams\\[0\\]"),
        ("src count", ([d], [], 1, [0]), ValueError, "src"),
    ]  # fmt: skip
    for name, args, exc, match in cases:
        before = [x.clone() for x in args[0]]
        with lk.use_backend(backend), pytest.raises(exc, match=match):
            torch.ops.lorenza_kernels.stochastic_round_(*args)
        assert all(torch.equal(x, b) for x, b in zip(args[0], before)), name
