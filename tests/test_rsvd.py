"""Batched randomized SVD (docs/kernels.md section 3): quality, determinism, batching, edge cases, ops.

Inputs are fresh random matrices on every run (no fixed torch seed): every assertion must hold for
any draw. Matrices with a prescribed spectrum are A = U diag(s) V^T with Haar-random U, V.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import require_backend

import lorenza_kernels as lk
from lorenza_kernels import _ops, _registry
from lorenza_kernels.reference import rsvd as ref

SPECTRA = {
    "geometric": lambda i: 0.93**i,
    "power1": lambda i: 1.0 / (i + 1),
    "power0.5": lambda i: (i + 1) ** -0.5,
}


def spectral(m: int, n: int, spectrum: str = "geometric", batch: tuple[int, ...] = (), device="cpu") -> torch.Tensor:
    p = min(m, n)
    U = torch.linalg.qr(torch.randn(*batch, m, p, dtype=torch.float64, device=device))[0]
    V = torch.linalg.qr(torch.randn(*batch, n, p, dtype=torch.float64, device=device))[0]
    s = SPECTRA[spectrum](torch.arange(p, dtype=torch.float64, device=device))
    return ((U * s) @ V.mT).float()


def orth_error(Q: torch.Tensor) -> float:
    eye = torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)
    return (Q.mT @ Q - eye).abs().max().item() if Q.numel() else 0.0


def proj_error(A: torch.Tensor, Q: torch.Tensor, side: str = "left") -> torch.Tensor:
    """||A - Q Q^T A||_F (left) or ||A - A Q Q^T||_F (right), in float64."""
    A, Q = A.double(), Q.double()
    R = A - Q @ (Q.mT @ A) if side == "left" else A - (A @ Q) @ Q.mT
    return torch.linalg.matrix_norm(R)


def optimal_error(A: torch.Tensor, rank: int) -> torch.Tensor:
    s = torch.linalg.svdvals(A.double())
    return s[..., rank:].square().sum(-1).sqrt()


# --- quality against torch.linalg.svd --------------------------------------------------------------


@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("shape", [(300, 180), (160, 280)], ids=["m>n", "m<n"])
def test_quality_defaults(spectrum, shape, device):
    m, n = shape
    rank = 24
    A = spectral(m, n, spectrum, batch=(2,), device=device)
    opt = optimal_error(A, rank)
    for side in ("left", "right"):
        Q = lk.randomized_range(A, rank, side=side, seed=torch.randint(0, 2**62, ()).item())
        assert Q.shape == (2, m if side == "left" else n, rank) and Q.dtype == torch.float32
        assert orth_error(Q) < 1e-5
        ratio = proj_error(A, Q, side) / opt
        assert (ratio <= 1.05).all(), (side, ratio)


def test_svd_matches_range_and_bounds(device):
    m, n, rank = 240, 200, 16
    A = spectral(m, n, "geometric", device=device)
    U, S, Vh = lk.randomized_svd(A, rank, seed=11, first_stream=4)
    Q = lk.randomized_range(A, rank, side="right", seed=11, first_stream=4)
    # the same sketch and subspace: Vh^T is the right basis up to rounding (well separated spectrum)
    torch.testing.assert_close(Vh.mT, Q, atol=1e-4, rtol=0)
    Ql = lk.randomized_range(A, rank, side="left", seed=11, first_stream=4)
    torch.testing.assert_close(Ql, lk.randomized_svd(A.mT, rank, seed=11, first_stream=4)[2].mT, atol=1e-4, rtol=0)
    assert orth_error(U) < 1e-5 and orth_error(Vh.mT) < 1e-5
    s_true = torch.linalg.svdvals(A.double())[:rank].float()
    # S are the singular values of Q^T A (Q the internal k-dim basis): by interlacing at most the
    # true ones, and by Weyl at most ||A - Q Q^T A||_2 <= ||A - U U^T A||_2 below them (U is in span Q)
    gap = torch.linalg.matrix_norm(A.double() - U.double() @ (U.double().mT @ A.double()), ord=2).item()
    assert (S <= s_true * (1 + 1e-5)).all() and (S[:-1] >= S[1:]).all()
    assert (S >= s_true - gap * (1 + 1e-4)).all()
    err = torch.linalg.matrix_norm(A.double() - (U.double() * S.double()) @ Vh.double())
    assert err <= 1.05 * optimal_error(A, rank)


def test_full_rank_is_exact(device):
    for m, n in [(40, 25), (25, 40)]:
        A = torch.randn(m, n, device=device)
        p = min(m, n)
        U, S, Vh = lk.randomized_svd(A, p, oversample=0, power_iters=0)
        torch.testing.assert_close((U * S) @ Vh, A, atol=1e-4, rtol=0)
        torch.testing.assert_close(S, torch.linalg.svdvals(A), atol=1e-4, rtol=1e-4)
        for side in ("left", "right"):
            Q = lk.randomized_range(A, p, side=side)
            assert proj_error(A, Q, side) < 1e-4 * torch.linalg.matrix_norm(A.double())
            # rank + oversample > min(m, n): the sketch is clamped to the whole space, the answer exact
            Q = lk.randomized_range(A, p - 5, side=side, power_iters=0)
            assert proj_error(A, Q, side) <= (1 + 1e-4) * optimal_error(A, p - 5)


# --- determinism, batching, lists ----------------------------------------------------------------


def test_seed_determinism():
    A = spectral(120, 90, "power1")
    a = lk.randomized_range(A, 10, seed=2**64 - 3, first_stream=9)
    b = lk.randomized_range(A.clone(), 10, seed=2**64 - 3, first_stream=9)
    assert torch.equal(a, b)
    c = lk.randomized_range(A, 10, seed=2**64 - 4, first_stream=9)
    d = lk.randomized_range(A, 10, seed=2**64 - 3, first_stream=10)
    assert not torch.equal(a, c) and not torch.equal(a, d)


def test_sketch_is_the_seeded_stream():
    streams, k, n, seed = [3, 0, 2**32 - 1], 5, 11, 2**63 + 12345
    omega_t = ref.sketch_matrix_t(streams, k, n, seed - 2**64, torch.device("cpu"))
    for b, s in enumerate(streams):
        with lk.use_backend("reference"):
            assert torch.equal(omega_t[b], lk.gaussian((k, n), seed, s))
        # any backend's stream (the C++ one when built) agrees within docs/rng.md's contract
        torch.testing.assert_close(omega_t[b], lk.gaussian((k, n), seed, s), atol=1e-5, rtol=0)


def test_batched_equals_looped(device):
    A = spectral(64, 48, "geometric", batch=(2, 3), device=device)
    U, S, Vh = lk.randomized_svd(A, 8, seed=5, first_stream=7)
    Q = lk.randomized_range(A, 8, side="right", seed=5, first_stream=7)
    for i in range(2):
        for j in range(3):
            stream = 7 + 3 * i + j
            u, s, vh = lk.randomized_svd(A[i, j], 8, seed=5, first_stream=stream)
            torch.testing.assert_close((U[i, j], S[i, j], Vh[i, j]), (u, s, vh), atol=1e-5, rtol=1e-5)
            q = lk.randomized_range(A[i, j], 8, side="right", seed=5, first_stream=stream)
            torch.testing.assert_close(Q[i, j], q, atol=1e-5, rtol=0)


def test_list_equals_individual_in_input_order(device):
    shapes = [(64, 48), (48, 64), (64, 48), (40, 40), (64, 48), (48, 64), (64, 48)]
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.float32, torch.float32]
    mats = [spectral(m, n, "geometric", device=device).to(dt) for (m, n), dt in zip(shapes, dtypes)]
    ranks = [8, 8, 8, 6, 8, 4, 8]
    sides = ["auto", "left", "auto", "right", "auto", "auto", "left"]
    kw = dict(oversample=6, power_iters=1, seed=99, first_stream=3)
    expected = [
        lk.randomized_range(A, r, side=s, oversample=6, seed=99, first_stream=3 + i)
        for i, (A, r, s) in enumerate(zip(mats, ranks, sides))
    ]
    for max_batch in (None, 1, 2):
        got = lk.randomized_range_list(mats, ranks, sides=sides, max_batch=max_batch, **kw)
        assert len(got) == len(mats)
        for i, (g, e) in enumerate(zip(got, expected)):
            assert g.shape == e.shape, i
            torch.testing.assert_close(g, e, atol=1e-5, rtol=0, msg=lambda msg, i=i: f"matrix {i}: {msg}")
    assert lk.randomized_range_list([], 4) == []


def test_low_precision_inputs_are_upcast(device):
    A = spectral(80, 60, "geometric", device=device)
    for dt in (torch.bfloat16, torch.float16):
        a = lk.randomized_range(A.to(dt), 6, seed=3)
        b = lk.randomized_range(A.to(dt).float(), 6, seed=3)
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


# --- orthonormalisation --------------------------------------------------------------------------


def test_orthonormalize_paths_and_fallback():
    N, k = 300, 24

    def with_condition(kappa: float) -> torch.Tensor:
        U = torch.linalg.qr(torch.randn(N, k, dtype=torch.float64))[0]
        V = torch.linalg.qr(torch.randn(k, k, dtype=torch.float64))[0]
        return ((U * torch.logspace(0, -math.log10(kappa), k, dtype=torch.float64)) @ V.T).float()

    duplicate = torch.randn(N, k)
    duplicate[:, 1] = duplicate[:, 0]  # exactly rank-deficient
    zero_cols = torch.randn(N, k)
    zero_cols[:, 5:] = 0.0  # a zero diagonal of X^T X: no shift can make Cholesky succeed
    graded = torch.randn(N, k) * torch.logspace(0, -6, k)  # well conditioned after column scaling
    X = torch.stack([with_condition(10.0), with_condition(1e6), duplicate, zero_cols, torch.zeros(N, k), graded])
    Q, R, path = ref.orthonormalize(X.clone(), return_path=True)
    # a duplicated column leaves rounding noise that passes 1-3 may orthonormalise into a valid
    # completion of the basis (path 3) or that makes Cholesky fail (Householder): both are fine
    assert path[2].item() in (ref.PATH_CHOLQR3, ref.PATH_HOUSEHOLDER)
    path[2] = -1
    assert path.tolist() == [
        ref.PATH_CHOLQR2,
        ref.PATH_CHOLQR3,
        -1,
        ref.PATH_HOUSEHOLDER,
        ref.PATH_HOUSEHOLDER,
        ref.PATH_CHOLQR2,
    ]
    assert torch.isfinite(Q).all() and torch.isfinite(R).all()
    for b in range(X.shape[0]):
        assert orth_error(Q[b]) < 1e-5, b
    torch.testing.assert_close(Q @ R, X, atol=1e-5 * X.abs().amax().item(), rtol=0)
    assert torch.equal(torch.triu(R), R)


def test_rank_deficient_and_zero_matrices(device):
    deficient = torch.randn(70, 3, device=device) @ torch.randn(3, 50, device=device)
    zero = torch.zeros(70, 50, device=device)
    for A in (deficient, zero):
        for side in ("left", "right"):
            Q = lk.randomized_range(A, 10, side=side)
            assert torch.isfinite(Q).all() and orth_error(Q) < 1e-5
            assert proj_error(A, Q, side) <= 1e-5 * max(1.0, torch.linalg.matrix_norm(A).item())
        U, S, Vh = lk.randomized_svd(A, 10)
        assert torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all()
        assert orth_error(U) < 1e-5 and orth_error(Vh.mT) < 1e-5
        assert (S[3:] <= 1e-4 * max(1.0, S[0].item())).all()


# --- edge cases and errors -----------------------------------------------------------------------


def test_batch_of_one_and_empty_batch():
    A = spectral(30, 20)
    torch.testing.assert_close(lk.randomized_range(A[None], 5)[0], lk.randomized_range(A, 5), atol=0, rtol=0)
    empty = torch.empty(0, 3, 30, 20)
    assert lk.randomized_range(empty, 5).shape == (0, 3, 30, 5)
    assert lk.randomized_range(empty, 5, side="right").shape == (0, 3, 20, 5)
    U, S, Vh = lk.randomized_svd(empty, 5)
    assert U.shape == (0, 3, 30, 5) and S.shape == (0, 3, 5) and Vh.shape == (0, 3, 5, 20)


def test_argument_errors():
    A = torch.randn(20, 12)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="rank"):
            lk.randomized_range(A, bad)
    with pytest.raises(ValueError, match=r"rank: must be <= min\(m, n\) = 12"):
        lk.randomized_svd(A, 13)
    with pytest.raises(TypeError, match="rank"):
        lk.randomized_range(A, 2.0)
    for bad_value in (float("nan"), float("inf")):
        B = A.clone()
        B[3, 4] = bad_value
        with pytest.raises(ValueError, match=r"A\[0\]: contains NaN or Inf"):
            lk.randomized_svd(B, 4)
        with pytest.raises(ValueError, match=r"matrices\[1\]: contains NaN or Inf"):
            lk.randomized_range_list([A, B], 4)
    for dt in (torch.int32, torch.int64, torch.float64, torch.complex64):
        with pytest.raises(TypeError, match="A: dtype"):
            lk.randomized_range(A.to(dt), 4)
    with pytest.raises(ValueError, match="A: expected shape"):
        lk.randomized_range(torch.randn(5), 1)
    with pytest.raises(ValueError, match="side"):
        lk.randomized_range(A, 4, side="top")
    with pytest.raises(ValueError, match="oversample"):
        lk.randomized_range(A, 4, oversample=-1)
    with pytest.raises(ValueError, match="power_iters"):
        lk.randomized_range(A, 4, power_iters=-1)
    with pytest.raises(ValueError, match="seed"):
        lk.randomized_range(A, 4, seed=2**64)
    with pytest.raises(ValueError, match=r"ranks\[1\]"):
        lk.randomized_range_list([A, A], [4, 13])
    with pytest.raises(ValueError, match="ranks: expected one value or 2 values"):
        lk.randomized_range_list([A, A], [4, 4, 4])
    with pytest.raises(ValueError, match=r"matrices\[0\]: expected a matrix"):
        lk.randomized_range_list([torch.randn(2, 20, 12)], 4)


def test_no_oversampling_no_power_iterations_and_grad_input():
    A = spectral(90, 70, "geometric").requires_grad_()
    Q = lk.randomized_range(A, 8, oversample=0, power_iters=0)
    assert not Q.requires_grad and orth_error(Q) < 1e-5
    Q3 = lk.randomized_range(A, 8, power_iters=3)
    assert proj_error(A.detach(), Q3) <= 1.01 * optimal_error(A.detach(), 8)


# --- torch.library ops ---------------------------------------------------------------------------


def test_opcheck():
    A = torch.randn(2, 24, 18)
    torch.library.opcheck(_ops.rsvd_sketch, (A, 7, 3, [1, 5]))
    torch.library.opcheck(_ops.randomized_range, (A, 4, 4, 1, -5, [0, 1]))
    torch.library.opcheck(_ops.randomized_range, (A.mT, 4, 4, 1, 2, [0, 1]))
    torch.library.opcheck(_ops.randomized_svd, (A, 4, 4, 1, 7, [3, 2]))


def test_meta_device():
    A = torch.empty(3, 40, 30, device="meta")
    assert lk.randomized_range(A, 5, side="right").shape == (3, 30, 5)
    U, S, Vh = _ops.randomized_svd(A, 5, 8, 1, 0, [0, 1, 2])
    assert U.shape == (3, 40, 5) and S.shape == (3, 5) and Vh.shape == (3, 5, 30) and U.device.type == "meta"


def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    # a batch with k = 48 > 32 takes the batched gesvda path for the small eigenproblem on CUDA
    A = spectral(200, 150, "geometric", batch=(3,))
    for rank in (10, 40):
        got = lk.randomized_range(A.cuda(), rank).cpu()
        assert orth_error(got) < 1e-5
        torch.testing.assert_close(got[..., :10], lk.randomized_range(A, rank)[..., :10], atol=1e-4, rtol=0)


def test_cpu_sketch_is_one_generator_call():
    """The CPU path writes Omega for the whole batch with one call of the C++ seeded_axpby_ kernel,
    member b on streams[b] (any streams, in any order)."""
    from lorenza_kernels.cpu import rsvd as cpu_rsvd

    require_backend("rsvd_sketch", "cpu", "cpu")
    calls = []
    real = cpu_rsvd.seeded_axpby_

    def spy(tensors, seed, streams, *args):
        calls.append(list(streams))
        return real(tensors, seed, streams, *args)

    streams = [4, 5, 6, 9, 0, 1]
    A = torch.randn(len(streams), 20, 11)
    seed = torch.randint(0, 2**62, ()).item()
    cpu_rsvd.seeded_axpby_ = spy
    try:
        got = cpu_rsvd.rsvd_sketch(A, 5, seed, streams)
    finally:
        cpu_rsvd.seeded_axpby_ = real
    assert calls == [streams]
    torch.testing.assert_close(got, ref.rsvd_sketch(A, 5, seed, streams), atol=1e-4, rtol=1e-5)


def test_cpu_backend_sketch():
    cpu_sketch = require_backend("rsvd_sketch", "cpu", "cpu")
    A = torch.randn(3, 40, 52)
    streams = [7, 8, 2]
    torch.testing.assert_close(cpu_sketch(A, 12, 5, streams), ref.rsvd_sketch(A, 12, 5, streams), atol=1e-4, rtol=1e-5)


# --- Triton (TRITON_INTERPRET=1 on the CPU) ------------------------------------------------------


@pytest.mark.triton_interpret
@pytest.mark.parametrize("case", ["quad", "per-element", "bf16-transposed", "tiny"])
def test_triton_sketch_matches_reference(case):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    triton_sketch = require_backend("rsvd_sketch", "triton", dev)
    nb, m, n, k = {
        "quad": (2, 40, 64, 20),
        "per-element": (3, 37, 50, 13),
        "bf16-transposed": (2, 70, 96, 40),
        "tiny": (1, 5, 3, 3),
    }[case]
    if case == "bf16-transposed":
        A = torch.randn(nb, n, m, device=dev).to(torch.bfloat16).mT
    else:
        A = torch.randn(nb, m, n, device=dev)
    seed = torch.randint(-(2**63), 2**63 - 1, ()).item()
    streams = torch.randint(0, 2**32, (nb,)).tolist()
    got = triton_sketch(A, k, seed, streams)
    want = _registry.implementation("rsvd_sketch", "reference", dev)(A, k, seed, streams)
    torch.testing.assert_close(got, want, atol=1e-4 * math.sqrt(n), rtol=1e-5)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("n", [64, 50], ids=["quad", "per-element"])
def test_triton_in_kernel_omega_is_the_stream(n):
    """With A = I the sketch is Omega itself: every element within docs/rng.md's 1e-5 of the reference."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    triton_sketch = require_backend("rsvd_sketch", "triton", dev)
    streams, k, seed = [0, 2**32 - 1], 24, 2**63 + 99
    eye = torch.eye(n, device=dev).expand(2, n, n)
    omega = triton_sketch(eye, k, seed - 2**64, streams)
    want = ref.sketch_matrix_t(streams, k, n, seed - 2**64, torch.device(dev)).mT
    torch.testing.assert_close(omega, want, atol=1e-5, rtol=0)


@pytest.mark.triton_interpret
def test_triton_stored_omega_is_the_stream():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    require_backend("rsvd_sketch", "triton", dev)
    from lorenza_kernels.triton import rsvd as triton_rsvd

    streams, k, n, seed = [5, 0, 2**32 - 1], 7, 51, 2**64 - 1  # k n not a multiple of 4
    got = triton_rsvd.sketch_matrix_t(streams, k, n, seed - 2**64, torch.device(dev))
    want = ref.sketch_matrix_t(streams, k, n, seed - 2**64, torch.device(dev))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.triton_interpret
@pytest.mark.parametrize("mode", ["fused", "stored"])
def test_triton_backend_end_to_end(mode, monkeypatch):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    require_backend("rsvd_sketch", "triton", dev)
    from lorenza_kernels.triton import rsvd as triton_rsvd

    monkeypatch.setattr(triton_rsvd, "SKETCH", mode)
    A = spectral(48, 64, "geometric", batch=(2,), device=dev)
    with lk.use_backend("reference"):
        want = lk.randomized_range(A, 6, seed=17)
    with lk.use_backend("triton"):
        got = lk.randomized_range(A, 6, seed=17)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_compiles_fullgraph():
    def basis(A):
        return torch.ops.lorenza_kernels.randomized_range(A, 4, 4, 1, 7, [0, 1]) * 2.0

    A = torch.randn(2, 30, 20)
    torch.testing.assert_close(torch.compile(basis, fullgraph=True, backend="aot_eager")(A), basis(A))


def test_svd_list_matches_single_calls_whatever_the_grouping():
    g = torch.Generator().manual_seed(5)
    mats = [torch.randn(20, 12, generator=g), torch.randn(9, 15, generator=g).mT, torch.randn(20, 12, generator=g)]
    mats.append(torch.randn(20, 12, generator=g).to(torch.bfloat16))
    ranks, streams = [3, 4, 3, 2], [7, 0, 3, (1 << 32) - 1]
    got = lk.randomized_svd_list(mats, ranks, seed=11, streams=streams, max_batch=2)
    for (U, S, Vh), A, r, s in zip(got, mats, ranks, streams):
        u, sv, vh = lk.randomized_svd(A, r, seed=11, first_stream=s)
        torch.testing.assert_close(U, u, atol=1e-5, rtol=0)
        torch.testing.assert_close(S, sv, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(Vh, vh, atol=1e-5, rtol=0)
        assert U.shape == (A.shape[0], r) and Vh.shape == (r, A.shape[1])
    with pytest.raises(ValueError, match=r"matrices\[1\]"):
        lk.randomized_svd_list([mats[0], torch.full((4, 4), float("nan"))], 2)
