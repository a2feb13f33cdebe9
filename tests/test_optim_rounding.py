"""Stochastic rounding of the updates of bfloat16/float16 parameters (``docs/algorithms.md``,
"Stochastic rounding"): every optimizer that writes a low-precision parameter follows its float32
run over thousands of steps where round-to-nearest stalls; reproducible; per group; float32 unchanged."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from _optim_common import single_thread  # noqa: F401

import lorenza.optim as lo

pytestmark = pytest.mark.usefixtures("single_thread")

_g = torch.Generator().manual_seed(0)
W0 = torch.randn(16, 12, generator=_g) * 0.05  # weights of an LLM's scale: bfloat16 ulp ~ 2.4e-4 near 0.05
B0 = torch.randn(12, generator=_g) * 0.05
TW = W0.double() + 0.02 * torch.randn(16, 12, generator=_g, dtype=torch.float64)
TB = B0.double() + 0.02 * torch.randn(12, generator=_g, dtype=torch.float64)

# Steps of about 1e-5 per coordinate: below half an ulp of most bfloat16 weights here.
FACTORIES = {
    "MeZO": lambda W, b, **kw: lo.MeZO([W, b], lr=3e-3, **kw),
    "MeZOAdam": lambda W, b, **kw: lo.MeZOAdam([W, b], lr=1e-5, **kw),
    "AdaZoSAM": lambda W, b, **kw: lo.AdaZoSAM([W, b], lr=1e-5, **kw),
    "Lorenza": lambda W, b, **kw: lo.Lorenza(
        [{"params": [W], "rank": 2}, {"params": [b]}], lr=1e-5, update_interval=50, **kw
    ),  # fmt: skip
    "LorenzaPlus": lambda W, b, **kw: lo.LorenzaPlus(
        [{"params": [W], "rank": 2}, {"params": [b]}], lr=1e-5, update_interval=50, **kw
    ),  # fmt: skip
    "GaLoreAdamW": lambda W, b, **kw: lo.GaLoreAdamW(
        [{"params": [W], "rank": 2}, {"params": [b]}], lr=1e-5, update_interval=50, **kw
    ),  # fmt: skip
    "Loren": lambda W, b, **kw: lo.Loren([W, b], lr=3e-3, num_queries=4, **kw),
}


def _params(dtype):
    return torch.nn.Parameter(W0.to(dtype).clone()), torch.nn.Parameter(B0.to(dtype).clone())


def _loss(W, b):
    return ((W.double() - TW) ** 2).mean() + ((b.double() - TB) ** 2).mean()


def _run(name, dtype, steps, **kw):
    W, b = _params(dtype)
    opt = FACTORIES[name](W, b, seed=3, **kw)
    start = float(_loss(W, b))
    for _ in range(steps):
        opt.step(lo.make_closure(_loss, W, b))
    return start - float(_loss(W, b)), (W, b), opt


@pytest.mark.parametrize("name", list(FACTORIES))
def test_low_precision_updates_follow_float32_over_2000_steps(name):
    steps = 2000
    ref, _, _ = _run(name, torch.float32, steps)
    assert ref > 0
    for dtype in (torch.bfloat16, torch.float16):
        got, _, _ = _run(name, dtype, steps)
        assert 0.9 * ref <= got <= 1.1 * ref, (dtype, got / ref)
    # the regime matters: round-to-nearest loses most of these updates in bfloat16
    nearest, _, _ = _run(name, torch.bfloat16, steps, stochastic_rounding=False)
    assert nearest < 0.6 * ref, nearest / ref


@pytest.mark.parametrize("name", list(FACTORIES))
def test_float32_parameters_are_unaffected_by_the_option(name):
    _, on, _ = _run(name, torch.float32, 5, stochastic_rounding=True)
    _, off, _ = _run(name, torch.float32, 5, stochastic_rounding=False)
    assert all(torch.equal(a, b) for a, b in zip(on, off))


@pytest.mark.parametrize("name", ["MeZO", "AdaZoSAM", "Lorenza", "Loren"])
def test_rounding_is_reproducible_and_resumes_bitwise(name):
    _, a, _ = _run(name, torch.bfloat16, 20)
    _, b, _ = _run(name, torch.bfloat16, 20)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # 10 steps, state_dict through weights_only, 10 more: the rounding bits depend on (seed, step, stream)
    W, bb = _params(torch.bfloat16)
    opt = FACTORIES[name](W, bb, seed=3)
    for _ in range(10):
        opt.step(lo.make_closure(_loss, W, bb))
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "W": W.detach(), "b": bb.detach()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    W2, b2 = torch.nn.Parameter(ck["W"].clone()), torch.nn.Parameter(ck["b"].clone())
    opt2 = FACTORIES[name](W2, b2, seed=11)
    opt2.load_state_dict(ck["opt"])
    for _ in range(10):
        opt2.step(lo.make_closure(_loss, W2, b2))
    assert torch.equal(W2, a[0]) and torch.equal(b2, a[1])


@pytest.mark.parametrize("name", ["AdaZoSAM", "Lorenza", "GaLoreAdamW"])
def test_per_layer_mode_rounds_with_the_same_bits(name):
    _, normal, _ = _run(name, torch.bfloat16, 6)
    _, layered, _ = _run(name, torch.bfloat16, 6, per_layer=True)
    assert all(torch.equal(a, b) for a, b in zip(normal, layered))


@pytest.mark.parametrize("name", ["MeZO", "AdaZoSAM", "Loren"])
def test_the_option_is_per_group(name):
    # a group that turns it off rounds to nearest, bitwise as a run with it off everywhere; the other
    # group rounds stochastically, bitwise as a run with it on everywhere (one step: later steps
    # couple the groups through the loss)
    def run(flags):
        W, b = _params(torch.bfloat16)
        cls = {"MeZO": lo.MeZO, "AdaZoSAM": lo.AdaZoSAM, "Loren": lo.Loren}[name]
        lr = 1e-5 if name == "AdaZoSAM" else 3e-3
        opt = cls([{"params": [W], "stochastic_rounding": flags[0]}, {"params": [b], "stochastic_rounding": flags[1]}],
                  lr=lr, seed=3)  # fmt: skip
        opt.step(lo.make_closure(_loss, W, b))
        return W, b

    mixed, on, off = run((False, True)), run((True, True)), run((False, False))
    assert torch.equal(mixed[0], off[0]) and torch.equal(mixed[1], on[1])
    assert not torch.equal(on[0], off[0])


def test_the_option_is_checked():
    W, b = _params(torch.bfloat16)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        lo.MeZO([W, b], stochastic_rounding="yes")
    opt = lo.AdaZoSAM([W, b])
    snap = copy.deepcopy(opt.state_dict())
    with pytest.raises(TypeError, match="stochastic_rounding"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "stochastic_rounding": 1})
    assert opt.state_dict()["param_groups"] == snap["param_groups"]


def test_old_checkpoints_without_the_option_round_stochastically():
    # a group saved before the option existed has no key: the default (on) applies
    W, b = _params(torch.bfloat16)
    opt = lo.AdaZoSAM([W, b], lr=1e-5, seed=3)
    sd = opt.state_dict()
    for g in sd["param_groups"]:
        del g["stochastic_rounding"]
    opt.load_state_dict(sd)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lo.make_closure(_loss, W, b))
