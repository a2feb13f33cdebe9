"""Triton specifics of the seeded ops: the Philox stream through ``tl.philox``, the multi-tensor
launch (table, chunks, dtype branches, tails), the rank-one term, column sums and determinism.

Runs on the CPU under ``TRITON_INTERPRET=1`` (shapes kept small: the interpreter costs tens of
milliseconds per program) or on a CUDA device. The generic cross-backend tests live in
``test_seeded_ops.py``. Inputs and seeds are fresh every run; failures print the seed.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

triton = pytest.importorskip("triton")
tl = triton.language

from conftest import AXPBY_TOL, TRITON_INTERPRET, dtype_id, poison_  # noqa: E402

from lorenza_kernels import _registry, use_backend  # noqa: E402
from lorenza_kernels import seeded_axpby_ as public_axpby_  # noqa: E402
from lorenza_kernels._shapes import matrix_dims  # noqa: E402
from lorenza_kernels.reference import seeded_ops as ref  # noqa: E402
from lorenza_kernels.reference.rng import gaussian_range, rounding_words, stochastic_round  # noqa: E402
from lorenza_kernels.triton import rng as trng  # noqa: E402
from lorenza_kernels.triton import seeded_ops as tops  # noqa: E402

pytestmark = pytest.mark.triton_interpret

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ODD_SHAPES = [(0,), (1,), (3,), (5, 13, 17), (7,), (2, 3), (4, 0, 3), (11, 9), (6, 1, 5)]


@pytest.fixture
def dev() -> str:
    """Interpreter on the CPU when TRITON_INTERPRET=1, else the GPU; decided lazily (never at collection)."""
    if TRITON_INTERPRET:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 (CPU interpreter) or a CUDA device")


@pytest.fixture
def poisoned_empty(monkeypatch):
    """``torch.empty`` returns NaN-filled floating tensors: an output or partial-sum element that a
    kernel forgets to write shows up as NaN."""
    empty = torch.empty

    def _empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return poison_(t) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", _empty)


def _seed() -> int:
    return random.getrandbits(64)


def _i64(seed: int) -> int:
    return seed - (1 << 64) if seed >= (1 << 63) else seed


def test_philox_known_answers(dev):
    # Random123 kat_vectors, through tl.philox with the key passed as the 64-bit seed (docs/rng.md).
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    got = trng.philox4x32([c for c, _, _ in kat], [k for _, k, _ in kat], device=dev)
    assert got == [x for _, _, x in kat]


@pytest.mark.parametrize(
    "seed,stream,first",
    [
        (0, 0, [0.9911375, -0.9246628, -0.6176091, -0.4820683, -0.1536382, 0.1808258, 0.8317351, 0.1974396]),
        (1, 0, [0.3804007, -0.2962778, -0.2492331, -1.0038373, 0.6269479, -0.6339836, -0.6782714, -1.0130807]),
        (1, 1, [-0.1650479, 2.6764474, -1.5598533, 0.7548958, 1.5844943, -0.6431312, -0.3800066, 0.5067777]),
        (
            1099511627783,
            3,
            [-0.2224926, -0.3849995, -1.0488936, 0.5205431, -1.4329347, 0.6782839, 0.1174121, -1.0960013],
        ),
        (123456789, 0, [-0.8675240, 1.7846837, 0.4166728, 0.4518241, 1.1816259, 0.0326168, 0.6252942, 1.3828443]),
    ],
)
def test_stream_known_values(dev, seed, stream, first):
    z = trng.gaussian(8, seed, stream, device=dev).cpu().double()
    torch.testing.assert_close(z, torch.tensor(first, dtype=torch.float64), atol=1e-5, rtol=0)


def test_stream_matches_float64(dev):
    # >= 10^5 elements; seeds >= 2^32 and >= 2^63, streams >= 2^16, a block index >= 2^32 (c1 != 0),
    # lengths that are not multiples of 4.
    cases = [
        (_seed() >> 40, 0, 0, 40_003),
        (_seed() | (1 << 63), (1 << 16) + 3, 0, 30_001),
        ((1 << 40) + 7, (1 << 32) - 1, 4 * ((1 << 32) + 9), 30_002),
    ]
    for seed, stream, start, numel in cases:
        z = trng.gaussian(numel, seed, stream, start=start, device=dev, block=16384).cpu().double()
        want = gaussian_range(start, start + numel, seed, stream, compute_dtype=torch.float64)
        err = (z - want).abs().max().item()
        assert err < 1e-5, f"seed={seed} stream={stream} start={start}: max error {err}"


@triton.jit
def _box_muller_probe(k_ptr, r_ptr, c_ptr, s_ptr, N: tl.constexpr):
    offs = tl.program_id(0) * N + tl.arange(0, N)
    x = (tl.load(k_ptr + offs).to(tl.uint32) << 9) | 0x1FF  # the 9 dropped bits must not matter
    u = ((x >> 9).to(tl.int32).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    tl.store(r_ptr + offs, tl.sqrt(trng.neg2_log(u)))
    c, s = trng.cos_sin_turns((x >> 9).to(tl.int32))
    tl.store(c_ptr + offs, c)
    tl.store(s_ptr + offs, s)


def test_box_muller_accuracy_over_uniforms(dev):
    # The hand-written log and sincos over a 1/61 sample of all 2^23 uniforms plus the edges
    # (u near 0 and 1, quarter-turn boundaries): |dz| <= |dr| + r_max |d(cos, sin)| < 1e-5.
    edges = [0, 1, 2, (1 << 23) - 2, (1 << 23) - 1] + [q * (1 << 21) + d for q in range(1, 4) for d in (-1, 0, 1)]
    k = torch.cat([torch.arange(0, 1 << 23, 61), torch.tensor(edges)])
    n = 1 << 14
    k = torch.cat([k, k[: (-k.numel()) % n]]).to(dev)
    r, c, s = (torch.empty(k.numel(), device=dev) for _ in range(3))
    _box_muller_probe[(k.numel() // n,)](k, r, c, s, N=n)
    u = (k.cpu().double() + 0.5) * 2.0**-23
    err_r = (r.cpu().double() - torch.sqrt(-2 * torch.log(u))).abs().max().item()
    err_c = (c.cpu().double() - torch.cos(2 * math.pi * u)).abs().max().item()
    err_s = (s.cpu().double() - torch.sin(2 * math.pi * u)).abs().max().item()
    assert err_r + math.sqrt(-2 * math.log(2.0**-24)) * max(err_c, err_s) < 1e-5, (err_r, err_c, err_s)


def _check_like_reference(got: torch.Tensor, want: torch.Tensor, truth: torch.Tensor, msg: str) -> None:
    atol, rtol = AXPBY_TOL[got.dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol, msg=msg)
    if got.dtype != torch.float32 and got.numel():
        # flash-attention's rule: no worse than twice the reference's own error against float64.
        err, err_ref = ((t.double() - truth).abs().max().item() for t in (got, want))
        assert err <= 2 * err_ref + 1e-6, f"{msg}: error {err} vs reference {err_ref}"


def _run_both(tensors, seed, alpha, beta, first_stream, rows=None, gamma=None, **kw):
    """Triton against the reference; tensor k on stream first_stream + k, odd ones from the end
    of the range, so that the per-tensor stream field of the table is exercised out of order."""
    streams = [first_stream + k if k % 2 == 0 else (1 << 32) - 1 - k for k in range(len(tensors))]
    ours = [t.clone() for t in tensors]
    theirs = [t.clone() for t in tensors]
    n_ours = tops.seeded_axpby_(ours, seed, streams, alpha, beta, rows, gamma, **kw)
    n_ref = ref.seeded_axpby_(theirs, seed, streams, alpha, beta, rows, gamma)
    truth = []
    for k, t in enumerate(tensors):
        z = gaussian_range(0, t.numel(), seed, streams[k], compute_dtype=torch.float64).to(t.device)
        x = alpha[k] * z + (beta[k] * t.double().reshape(-1) if beta[k] != 0 else 0)
        if rows is not None and gamma[k] != 0:
            x = x + gamma[k] * rows[k].double()[torch.arange(t.numel(), device=t.device) % matrix_dims(t)[1]]
        truth.append(x.reshape(t.shape))
    return ours, theirs, truth, n_ours, n_ref


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_axpby_matches_reference(dev, dtype):
    seed = _seed()
    tensors = [torch.randn(s, dtype=dtype, device=dev) for s in ODD_SHAPES]
    alpha = [random.uniform(-2, 2) for _ in tensors]
    beta = [0.0 if k % 3 == 0 else random.uniform(-1.5, 1.5) for k in range(len(tensors))]
    for t, b in zip(tensors, beta):
        if b == 0.0:
            poison_(t)  # beta == 0 must not read t
    ours, theirs, truth, n_ours, n_ref = _run_both(tensors, _i64(seed), alpha, beta, 5)
    for k, (o, w, x) in enumerate(zip(ours, theirs, truth)):
        assert not o.isnan().any(), f"seed={seed} tensor {k}: NaN"
        _check_like_reference(o, w, x, f"seed={seed} tensor {k} shape {tuple(o.shape)}")
    torch.testing.assert_close(n_ours, n_ref, rtol=1e-5, atol=1e-5, msg=f"seed={seed}")


def test_mixed_list_is_one_launch(dev, monkeypatch, poisoned_empty):
    # Every dtype, empty tensors in between, large seed and stream; one main launch for the list.
    seed = _seed() | (1 << 63)
    shapes = [(3, 7), (0,), (129,), (2, 2, 2), (0, 4), (1,), (5, 13, 17)]
    tensors = [torch.randn(s, dtype=DTYPES[k % 3], device=dev) for k, s in enumerate(shapes)]
    alpha, beta = [0.75] * len(shapes), [0.5] * len(shapes)
    launches = []
    kernel = tops._seeded_axpby_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tops, "_seeded_axpby_kernel", Spy())
    ours, theirs, truth, n_ours, n_ref = _run_both(tensors, _i64(seed), alpha, beta, 1 << 31)
    assert len(launches) == 1
    for k, (o, w, x) in enumerate(zip(ours, theirs, truth)):
        _check_like_reference(o, w, x, f"seed={seed} tensor {k}")
    torch.testing.assert_close(n_ours, n_ref, rtol=1e-5, atol=1e-5)
    assert n_ours[1] == 0 and n_ours[4] == 0


def test_many_chunks_and_tails(dev, poisoned_empty):
    # Small chunks (block 64 x 2 iterations): tensors span many programs, tails end mid-block,
    # and the binary search walks past tensors that have no chunks.
    seed = _seed()
    shapes = [(300,), (0,), (128,), (129,), (0, 3), (7, 37), (1,)]
    tensors = [torch.randn(s, dtype=DTYPES[k % 3], device=dev) for k, s in enumerate(shapes)]
    alpha, beta = [1.25] * len(shapes), [-0.5] * len(shapes)
    ours, theirs, truth, n_ours, n_ref = _run_both(tensors, _i64(seed), alpha, beta, 0, block=64, iters=2)
    for k, (o, w, x) in enumerate(zip(ours, theirs, truth)):
        _check_like_reference(o, w, x, f"seed={seed} tensor {k}")
    torch.testing.assert_close(n_ours, n_ref, rtol=1e-5, atol=1e-5)


def test_rank_one_term(dev):
    # Column index i % n on both paths (n >= block and n < block), gamma = 0 (row never read,
    # so NaN in it does not propagate) and 1-D tensors (one row of numel columns).
    seed = _seed()
    shapes = [(3, 100), (9, 5), (70,), (4, 3, 3), (6, 7)]
    tensors = [torch.randn(s, dtype=DTYPES[k % 3], device=dev) for k, s in enumerate(shapes)]
    rows = [torch.randn(matrix_dims(t)[1], device=dev) for t in tensors]
    gamma = [random.uniform(-1, 1) for _ in shapes]
    gamma[4] = 0.0
    poison_(rows[4])
    alpha, beta = [0.5] * len(shapes), [1.0] * len(shapes)
    ours, theirs, truth, n_ours, n_ref = _run_both(tensors, _i64(seed), alpha, beta, 9, rows, gamma, block=64, iters=1)
    for k, (o, w, x) in enumerate(zip(ours, theirs, truth)):
        assert not o.isnan().any()
        _check_like_reference(o, w, x, f"seed={seed} tensor {k}")


@pytest.mark.parametrize("tiles", ["default", "small"])
def test_colsum_matches_reference(dev, tiles, poisoned_empty):
    # n % 4 == 0 (four normals per Philox call) and n % 4 != 0 (one call per element), empty
    # shapes, 1-D tensors; "small" tiles give several row groups per tensor, so the finishing
    # kernel adds partial rows.
    seed = _seed()
    shapes = [(37, 12), (0, 5), (5, 0), (21, 7), (3, 2, 3), (9,), (1, 1), (40, 33)]
    tensors = [torch.empty(s, dtype=DTYPES[k % 3], device=dev) for k, s in enumerate(shapes)]
    kw = {} if tiles == "default" else dict(col_block=16, col_rows=4, target=64, fin_block=16)
    streams = [77 + 3 * k for k in range(len(tensors))][::-1]
    got = tops.seeded_colsum(tensors, _i64(seed), streams, **kw)
    want = ref.seeded_colsum(tensors, _i64(seed), streams)
    for k, (g, w, t) in enumerate(zip(got, want, tensors)):
        m = matrix_dims(t)[0]
        assert g.shape == w.shape and g.dtype == torch.float32
        torch.testing.assert_close(g, w, atol=1e-5 * max(1.0, math.sqrt(m)), rtol=1e-5, msg=f"seed={seed} tensor {k}")


def test_deterministic(dev):
    # Same inputs -> bitwise the same outputs, norms and column sums (no atomics anywhere).
    seed = _i64(_seed())
    tensors = [torch.randn(s, dtype=d, device=dev) for s, d in [((9, 20), torch.bfloat16), ((300,), torch.float32)]]
    a, b = [t.clone() for t in tensors], [t.clone() for t in tensors]
    na = tops.seeded_axpby_(a, seed, [4, 5], [0.3, -0.7], [1.0, 0.9], block=64, iters=2)
    nb = tops.seeded_axpby_(b, seed, [4, 5], [0.3, -0.7], [1.0, 0.9], block=64, iters=2)
    assert torch.equal(na, nb) and all(torch.equal(x, y) for x, y in zip(a, b))
    kw = dict(col_block=16, col_rows=4, target=64, fin_block=16)
    ca, cb = (tops.seeded_colsum(tensors[:1], seed, [4], **kw) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(ca, cb))


def test_registered_and_public_api(dev):
    assert _registry.implementation("seeded_axpby_", "triton", dev) is tops.seeded_axpby_
    assert _registry.implementation("seeded_colsum", "triton", dev) is tops.seeded_colsum
    seed = _seed()
    t = torch.randn(4, 6, dtype=torch.bfloat16, device=dev)
    want = t.clone()
    with use_backend("triton"):
        norms = public_axpby_([t], seed, 0.1, 1.0, first_stream=2)
    ref_norms = ref.seeded_axpby_([want], _i64(seed), [2], [0.1], [1.0])
    torch.testing.assert_close(t.float(), want.float(), **dict(zip(("atol", "rtol"), AXPBY_TOL[torch.bfloat16])))
    torch.testing.assert_close(norms, ref_norms, rtol=1e-5, atol=1e-5)


# --- stochastic rounding (docs/rng.md, "The rounding stream") -------------------------------------


@triton.jit
def _rounding_words_probe(out_ptr, args_ptr, N: tl.constexpr):
    seed = tl.load(args_ptr).to(tl.uint64, bitcast=True)
    stream = tl.load(args_ptr + 1).to(tl.uint32)
    first = tl.load(args_ptr + 2)  # a block index
    tl.store(out_ptr + tl.arange(0, N), trng.rounding_words(seed, first, stream, N // 4).to(tl.int64))
    idx = first * 4 + 3 + tl.arange(0, N)  # starts inside a block: one Philox call per element
    tl.store(out_ptr + N + tl.arange(0, N), trng.rounding_word_at(seed, idx, stream).to(tl.int64))


def test_rounding_words_match_reference(dev):
    for seed, stream, block in [(0, 0, 0), (_seed(), random.getrandbits(32), (1 << 32) + 5), ((1 << 64) - 1, 7, 3)]:
        out = torch.empty(128, dtype=torch.int64, device=dev)
        args = torch.tensor([_i64(seed), stream, block], dtype=torch.int64, device=dev)
        _rounding_words_probe[(1,)](out, args, N=64)
        start = 4 * block
        assert out[:64].cpu().tolist() == rounding_words(start, start + 64, seed, stream).tolist(), seed
        assert out[64:].cpu().tolist() == rounding_words(start + 3, start + 67, seed, stream).tolist(), seed


def _v_of(tensors, seed, streams, alpha, beta, rows=None, gamma=None, **kw):
    """The float32 values Triton computes before rounding: the same call on float32 copies."""
    vs = [t.to(torch.float32, copy=True) for t in tensors]
    tops.seeded_axpby_(vs, seed, streams, alpha, beta, rows, gamma, **kw)
    return vs


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    nan = a.float().isnan() & b.float().isnan()
    return bool(((a.float() == b.float()) | nan).all()) and torch.equal(torch.signbit(a[~nan]), torch.signbit(b[~nan]))


@pytest.mark.parametrize("kw", [{}, dict(block=64, iters=2)], ids=["default", "small-chunks"])
def test_axpby_rounding_one_launch_tails_and_rows(dev, monkeypatch, poisoned_empty, kw):
    """A mixed list with a rounding seed (float32 tensors untouched by it), tails that end inside a
    Philox block, empty tensors, the rank-one term: one main launch, and every 16-bit tensor is the
    reference's stochastic rounding of Triton's own float32 value, bit for bit."""
    seed, rseed = _i64(_seed()), _i64(_seed())
    shapes = [(3, 7), (0,), (129,), (2, 2, 2), (5, 13), (1,), (70,)]
    tensors = [torch.randn(s, dtype=DTYPES[k % 3], device=dev) for k, s in enumerate(shapes)]
    rows = [torch.randn(matrix_dims(t)[1], device=dev) for t in tensors]
    streams = [11 + k for k in range(len(shapes))][::-1]
    alpha, beta, gamma = [1e-3] * len(shapes), [1.0, 0.5, 0.0, 1.0, -1.0, 1.0, 0.25], [0.01] * len(shapes)
    launches = []
    kernel = tops._seeded_axpby_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    vs = _v_of(tensors, seed, streams, alpha, beta, rows, gamma, **kw)
    ours = [t.clone() for t in tensors]
    monkeypatch.setattr(tops, "_seeded_axpby_kernel", Spy())
    tops.seeded_axpby_(ours, seed, streams, alpha, beta, rows, gamma, rseed, **kw)
    assert len(launches) == 1
    for k, (o, v, s) in enumerate(zip(ours, vs, streams)):
        want = v.cpu().reshape(-1)
        if o.dtype != torch.float32:
            want = stochastic_round(want, rounding_words(0, v.numel(), rseed, s), o.dtype)
        assert _same(o.cpu(), want.reshape(o.shape).cpu()), f"seed={seed} rseed={rseed} tensor {k}"


@pytest.mark.parametrize("kw", [{}, dict(block=64, iters=2)], ids=["default", "small-chunks"])
def test_stochastic_round_one_launch(dev, monkeypatch, poisoned_empty, kw):
    """Every dtype in one launch, empty tensors, tails, a misaligned view (the unaligned path),
    streams in any order: bit for bit the reference."""
    seed = _seed()
    storage = torch.empty(400, dtype=torch.bfloat16, device=dev)
    dst = [
        torch.empty(5, 13, dtype=torch.float16, device=dev),
        torch.empty(0, device=dev),
        storage[3 : 3 + 130],
        torch.empty(7, device=dev),
        torch.empty(2, 65, dtype=torch.bfloat16, device=dev),
    ]
    src = [torch.randn(d.shape, device=dev) * 10.0 ** random.uniform(-6, 3) for d in dst]
    streams = [(1 << 32) - 1, 0, 5, 5, 77]
    launches = []
    kernel = tops._stochastic_round_kernel

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(tops, "_stochastic_round_kernel", Spy())
    tops.stochastic_round_(dst, src, _i64(seed), streams, **kw)
    assert len(launches) == 1
    for k, (d, x, s) in enumerate(zip(dst, src, streams)):
        want = stochastic_round(x.reshape(-1).cpu(), rounding_words(0, x.numel(), seed, s), d.dtype)
        assert _same(d.cpu(), want.reshape(d.shape)), f"seed={seed} tensor {k}"
