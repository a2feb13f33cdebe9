"""Exact probes (``probe="exact"``, the default): the parameters are never written by a probe.

The perturbed value is used where a parameter is read (``lorenza/optim/_probe.py``): same probe
as the in-place path for the same seed (to the rounding of the one addition), parameters bitwise
unchanged by any number of probes in every dtype, tied parameters perturbed alike, the ascent of
AdaZo-SAM/LORENZA restored bitwise with one layer's copy alive at a time."""

from __future__ import annotations

import weakref

import pytest
import torch
from _optim_common import MLP, SEED, mlp_closure, mlp_data, noise, params_of, single_thread  # noqa: F401
from torch import nn

import lorenza.optim as lo
from lorenza.optim import AdaZoSAM, Loren, Lorenza, MeZO, MeZOAdam, _noise, make_closure

pytestmark = pytest.mark.usefixtures("single_thread")

LOW = (torch.bfloat16, torch.float16)


def _deep(dtype=torch.float32, width=16, layers=4, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*blocks, nn.Linear(width, 1)).to(dtype)


def _data(dtype, width=16, n=16):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, width, generator=g)
    return x.to(dtype), torch.sin(x.sum(1, keepdim=True)).to(dtype)


def _closure(model, x, y):
    return make_closure(lambda: nn.functional.mse_loss(model(x).float(), y.float()))


ZO = {
    "mezo": lambda ps, probe: MeZO(ps, lr=0.0, mu=1e-3, num_probes=2, seed=SEED, probe=probe),
    "mezo_adam": lambda ps, probe: MeZOAdam(ps, lr=0.0, mu=1e-3, seed=SEED, probe=probe),
    "loren": lambda ps, probe: Loren(ps, lr=0.0, num_queries=3, lr_cov=0.0, seed=SEED, probe=probe),
    "adazo_sam": lambda ps, probe: AdaZoSAM(ps, lr=0.0, rho=0.05, mu=1e-3, seed=SEED, probe=probe),
    "lorenza": lambda ps, probe: Lorenza(ps, lr=0.0, rank=4, update_interval=3, seed=SEED, probe=probe),
}


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_mezo_lr0_leaves_parameters_bitwise_after_5000_steps(dtype):
    # The target of docs/algorithms.md "Exact probes": 5,000 steps of probes, nothing moves.
    model = nn.Linear(32, 4).to(dtype)
    x = torch.randn(8, 32).to(dtype)
    before = params_of(model)
    opt = MeZO(model.parameters(), lr=0.0, mu=1e-3, seed=SEED)
    closure = make_closure(lambda: model(x).float().square().mean())
    for _ in range(5000):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(ZO))
def test_lr0_exact_is_bitwise_and_inplace_drifts(name, dtype):
    # Every probing optimizer, the ascent of AdaZo-SAM and LORENZA included: exact probes leave the
    # parameters bitwise; the in-place path (the control) random-walks in 16-bit dtypes.
    x, y = _data(dtype)
    drift = {}
    for probe in ("exact", "inplace"):
        model = _deep(dtype)
        before = params_of(model)
        opt = ZO[name](model.parameters(), probe)
        for _ in range(60):
            opt.step(_closure(model, x, y))
        drift[probe] = max((a.float() - b.float()).abs().max().item() for a, b in zip(params_of(model), before))
    assert drift["exact"] == 0.0
    assert drift["inplace"] > 0.0  # the test can fail: the in-place path does move the weights


@pytest.mark.parametrize("name", list(ZO))
def test_exact_equals_inplace_in_float32(name):
    # The same seed gives the same probes on both paths (to the rounding of the additions).
    x, y = _data(torch.float32)
    models = {}
    for probe in ("exact", "inplace"):
        model = _deep()
        opt = ZO[name](model.parameters(), probe)
        for g in opt.param_groups:
            g["lr"] = 1e-2
        for _ in range(4):
            opt.step(_closure(model, x, y))
        models[probe] = params_of(model)
    for a, b in zip(models["exact"], models["inplace"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.emb = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)

    def forward(self, tokens):
        h = torch.tanh(self.mid(self.emb(tokens)))
        return h @ self.emb.weight.t()  # the embedding read a second time, as a tied LM head


def test_tied_parameter_sees_the_same_noise_at_every_read():
    model = Tied()
    tokens = torch.tensor([[1, 4, 7, 2]])
    target = torch.tensor([4, 7, 2, 9])
    losses = []

    def loss_fn():
        loss = nn.functional.cross_entropy(model(tokens)[0], target)
        losses.append(loss.detach())
        return loss

    opt = MeZO(model.parameters(), lr=0.0, mu=1e-2, seed=SEED)
    opt.step(make_closure(loss_fn))
    # L(theta + mu z) by hand: z of each parameter from its stream (its position in the optimizer).
    params = list(model.parameters())
    perturbed = [p.detach() + 1e-2 * noise(p.shape, SEED, 1, 0, s, torch.float32) for s, p in enumerate(params)]
    emb_w, mid_w, mid_b = perturbed
    h = torch.tanh(nn.functional.linear(nn.functional.embedding(tokens, emb_w), mid_w, mid_b))
    want = nn.functional.cross_entropy((h @ emb_w.t())[0], target)
    assert torch.equal(losses[0], want)


def test_raw_memory_reads_are_refused():
    model = nn.Linear(4, 2)
    opt = MeZO(model.parameters(), lr=1e-2, seed=SEED)
    before = params_of(model)
    with pytest.raises(RuntimeError, match="probe='inplace'"):
        opt.step(make_closure(lambda: model(torch.ones(1, 4)).sum() + model.weight.data_ptr() * 0))
    assert all(torch.equal(a, b) for a, b in zip(params_of(model), before))


def test_exact_ascent_keeps_one_copy_alive_at_a_time(monkeypatch):
    # Forward and backward of the ascent: the perturbed copies are regenerated for the backward
    # pass (saved-tensor hooks), so at most one layer's copies (weight, bias) are alive at once.
    alive, peak = set(), [0]
    make_real = _noise.Perturbation.materializer

    def counting(self, record=None):
        make = make_real(self, record)

        def tracked(param):
            out = make(param)
            key = id(out)
            alive.add(key)
            peak[0] = max(peak[0], len(alive))
            weakref.finalize(out, alive.discard, key)
            return out

        return tracked

    monkeypatch.setattr(_noise.Perturbation, "materializer", counting)
    model = _deep(layers=6)
    x, y = _data(torch.float32)
    opt = AdaZoSAM(model.parameters(), lr=1e-2, rho=0.05, seed=SEED)
    for _ in range(2):
        opt.step(_closure(model, x, y))
    assert 1 <= peak[0] <= 3, peak[0]  # 14 parameters: without the hooks all 14 would be kept


def test_probe_option_is_checked():
    with pytest.raises(ValueError, match="probe"):
        MeZO(nn.Linear(2, 2).parameters(), lr=1e-2, probe="lazy")


@pytest.mark.triton_interpret
def test_fused_linear_probe_equals_the_copy_path():
    # Where seeded_linear has a fast kernel (Triton: on CUDA, or the interpreter on the CPU), an
    # exact probe of nn.Linear generates the noise inside the GEMM instead of copying the weight.
    from conftest import TRITON_INTERPRET
    from torch.profiler import ProfilerActivity, profile

    import lorenza_kernels as lk

    if not TRITON_INTERPRET:
        pytest.skip("the Triton kernel runs on the CPU only under TRITON_INTERPRET=1")
    x, y = _data(torch.float32, width=16, n=8)
    results = {}
    for backend in ("reference", "triton"):
        model = _deep(layers=1)
        opt = MeZO(model.parameters(), lr=1e-2, mu=1e-3, seed=SEED)
        with lk.use_backend(backend), profile(activities=[ProfilerActivity.CPU]) as prof:
            loss = opt.step(_closure(model, x, y))
        calls = sum(1 for e in prof.events() if e.name == "lorenza_kernels::seeded_linear")
        results[backend] = (loss, params_of(model), calls)
    assert results["reference"][2] == 0 and results["triton"][2] == 4  # 2 linears x 2 probes
    torch.testing.assert_close(results["triton"][0], results["reference"][0], atol=1e-6, rtol=1e-5)
    for a, b in zip(results["triton"][1], results["reference"][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("probe", ["exact", "inplace"])
def test_adazo_sam_momentum_probe_ascends_along_the_first_moment(probe):
    # probe_space="momentum": c = (L(theta + mu M) - L(theta - mu M)) / (2 mu) with M Adam's first
    # moment; the gradient is taken at theta + rho sign(c) M / ||M|| (step 1: M = 0, no ascent).
    x, y = _data(torch.float32)
    model = _deep(layers=2)
    opt = AdaZoSAM(model.parameters(), lr=1e-2, rho=0.05, mu=1e-3, seed=SEED, probe=probe, probe_space="momentum")
    opt.step(_closure(model, x, y))
    theta = params_of(model)
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    seen, losses = [], []

    def loss_fn():
        loss = nn.functional.mse_loss(model(x), y)
        losses.append(float(loss.detach()))
        if torch.is_grad_enabled():
            seen.append([p.detach().clone() for p in model.parameters()])  # perturbed, in both paths
        return loss

    opt.step(make_closure(loss_fn))
    norm = torch.sqrt(sum(m.square().sum() for m in moments))
    sign = 1.0 if losses[0] > losses[1] else -1.0
    for got, t, m in zip(seen[0], theta, moments):
        torch.testing.assert_close(got - t, 0.05 * sign * m / norm, atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="num_probes"):
        AdaZoSAM(model.parameters(), probe_space="momentum", num_probes=2)
    with pytest.raises(ValueError, match="probe_space"):
        AdaZoSAM(model.parameters(), probe_space="singular")


@pytest.mark.parametrize("cls", ["AdaZoSAM", "Lorenza"])
def test_clipping_inside_the_ascent_closure_sees_the_parameters_gradients(cls):
    # A closure that clips after its backward pass (LorenzaTrainer with max_grad_norm) reads p.grad
    # inside the exact ascent: it must get the parameter's gradient, not a perturbed copy's (None).
    from lorenza.optim.closure import StepClosure

    def run(probe, clip):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        x = torch.randn(5, 6)
        kw = {"rank": 2, "update_interval": 2} if cls == "Lorenza" else {}
        opt = getattr(lo, cls)(model.parameters(), lr=1e-2, probe=probe, seed=1, **kw)
        norms = []
        for _ in range(3):
            c = StepClosure(lambda: model(x).square().mean(), clip_grad_norm=clip, clip_params=list(model.parameters()),
                            track_grad_norm=True)  # fmt: skip
            opt.step(c)
            norms.append(c.grad_norm)
        return [p.detach().clone() for p in model.parameters()], norms

    exact, n_exact = run("exact", 1e-9)  # below Adam's eps: clipping changes the update
    inplace, n_inplace = run("inplace", 1e-9)
    unclipped, _ = run("exact", None)
    assert all(n is not None and float(n) > 1e-2 for n in n_exact)
    torch.testing.assert_close(torch.stack(n_exact), torch.stack(n_inplace), rtol=1e-4, atol=0)
    for a, b in zip(exact, inplace):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(exact, unclipped))
