"""The lorenza-philox-v1 stream (docs/rng.md) in every backend."""

from __future__ import annotations

import pytest
import torch
from conftest import BACKENDS, require_backend

import lorenza_kernels as lk
from lorenza_kernels import _registry
from lorenza_kernels.reference.rng import gaussian_flat, gaussian_range, philox4x32_10

KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

KNOWN = {
    (0, 0): [0.9911375, -0.9246628, -0.6176091, -0.4820683, -0.1536382, 0.1808258, 0.8317351, 0.1974396],
    (1, 0): [0.3804007, -0.2962778, -0.2492331, -1.0038373, 0.6269479, -0.6339836, -0.6782714, -1.0130807],
    (1, 1): [-0.1650479, 2.6764474, -1.5598533, 0.7548958, 1.5844943, -0.6431312, -0.3800066, 0.5067777],
    (1099511627783, 3): [-0.2224926, -0.3849995, -1.0488936, 0.5205431, -1.4329347, 0.6782839, 0.1174121, -1.0960013],
    (123456789, 0): [-0.8675240, 1.7846837, 0.4166728, 0.4518241, 1.1816259, 0.0326168, 0.6252942, 1.3828443],
}

ACCURACY = 1e-5  # docs/rng.md: every backend within 1e-5 absolute of the float64 evaluation


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    out = philox4x32_10(tuple(torch.tensor([c], dtype=torch.int64) for c in counter), key)
    assert tuple(int(w) for w in out) == expected


@pytest.mark.parametrize("seed,stream", list(KNOWN))
def test_reference_float64_known_values(seed, stream):
    z = gaussian_flat(8, seed, stream, compute_dtype=torch.float64)
    assert torch.allclose(z, torch.tensor(KNOWN[(seed, stream)], dtype=torch.float64), atol=5.1e-8, rtol=0)


def test_reference_ranges_agree_with_the_whole_stream():
    whole = gaussian_flat(1001, 77, 5, compute_dtype=torch.float64)
    for start, stop in [(0, 1), (1, 4), (3, 9), (5, 1001), (998, 1001), (7, 7)]:
        part = gaussian_range(start, stop, 77, 5, compute_dtype=torch.float64)
        assert torch.equal(part, whole[start:stop])


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("seed,stream", list(KNOWN))
def test_backend_known_values(backend, dev, seed, stream):
    require_backend("seeded_axpby_", backend, dev)
    with lk.use_backend(backend):
        assert _registry.active("seeded_axpby_", dev) == backend
        z = lk.gaussian(8, seed, stream, device=dev)
    expected = torch.tensor(KNOWN[(seed, stream)], dtype=torch.float64)
    assert torch.allclose(z.double().cpu(), expected, atol=ACCURACY + 5e-8, rtol=0)


SEEDS = [0, 3, (1 << 32) + 5, 0xDEADBEEFCAFEF00D, (1 << 64) - 1]
STREAMS = [0, 7, (1 << 16) + 3, (1 << 32) - 1]


@pytest.mark.parametrize("backend,dev", BACKENDS)
def test_backend_against_float64_many_elements(backend, dev):
    """>= 10^5 elements per (seed, stream), sizes that are not multiples of 4."""
    require_backend("seeded_axpby_", backend, dev)
    numel = 100_003
    worst = 0.0
    for seed, stream in zip(SEEDS, STREAMS + [12345]):
        with lk.use_backend(backend):
            z = lk.gaussian((numel,), seed, stream, device=dev)
        exact = gaussian_flat(numel, seed, stream, compute_dtype=torch.float64)
        worst = max(worst, (z.double().cpu() - exact).abs().max().item())
    assert worst <= ACCURACY, f"{backend} on {dev}: max |z - z_f64| = {worst:.3g}"


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3,), (5,), (2, 0, 3), (7, 13), (5, 17, 19)], ids=str)
def test_backend_shapes(backend, dev, shape):
    require_backend("seeded_axpby_", backend, dev)
    with lk.use_backend(backend):
        z = lk.gaussian(shape, 11, 2, device=dev)
    assert z.shape == torch.Size(shape) and z.dtype == torch.float32
    exact = gaussian_flat(z.numel(), 11, 2, compute_dtype=torch.float64).reshape(shape)
    assert torch.allclose(z.double().cpu(), exact, atol=ACCURACY, rtol=0)


@pytest.mark.parametrize("backend,dev", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_backend_low_precision_is_rounded_once(backend, dev, dtype):
    require_backend("seeded_axpby_", backend, dev)
    with lk.use_backend(backend):
        z = lk.gaussian((4099,), 5, 9, dtype=dtype, device=dev)
    exact = gaussian_flat(4099, 5, 9, compute_dtype=torch.float64)
    err = (z.double().cpu() - exact).abs()
    ref_err = (exact.to(dtype).double() - exact).abs()  # rounding the exact value once
    # Rounded once from a float32 within 1e-5: at most one rounding step plus the 1e-5.
    ulp = torch.finfo(dtype).eps * exact.abs().clamp_min(torch.finfo(dtype).tiny)
    assert bool((err <= ref_err + ulp + ACCURACY).all())


def test_gaussian_is_deterministic_and_streams_differ():
    a = lk.gaussian((33,), 9, 0)
    assert torch.equal(a, lk.gaussian((33,), 9, 0))
    assert not torch.equal(a, lk.gaussian((33,), 9, 1))
    assert not torch.equal(a, lk.gaussian((33,), 10, 0))


def test_gaussian_statistics():
    z = lk.gaussian((1 << 18,), 2024, 1).double()
    assert abs(z.mean().item()) < 0.01
    assert abs(z.var().item() - 1.0) < 0.01


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1 << 64}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"stream": -2}, "stream"),
        ({"stream": 1 << 32}, "stream"),
        ({"dtype": torch.int32}, "dtype"),
        ({"dtype": torch.complex64}, "dtype"),
        ({"shape": (3, -1)}, "shape"),
    ],
)
def test_gaussian_bad_input(kwargs, match):
    args = {"shape": (4,), "seed": 1, "stream": 0, **kwargs}
    shape, seed, stream = args.pop("shape"), args.pop("seed"), args.pop("stream")
    with pytest.raises((ValueError, TypeError), match=match):
        lk.gaussian(shape, seed, stream, **args)
