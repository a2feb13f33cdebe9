"""Lorenza, Lorenza+, GaLoreAdamW: state dict round trip across a refresh, per-layer mode, skips,
bf16 parameters, schedulers, bad input, and the optimizer state against docs/algorithms.md's memory table."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from _optim_common import SEED, assert_params_equal, mlp_closure, single_thread  # noqa: F401

import lorenza_kernels as lk
from lorenza.optim import RESERVED_PROBE_BASE, GaLoreAdamW, Lorenza, LorenzaPlus, make_closure, probe_seed

pytestmark = pytest.mark.usefixtures("single_thread")


class Deep(torch.nn.Module):
    """fc1 6 x 10 (left side), fc2 9 x 6 (right side), fc3 2 x 9 (min(m, n) = 2 <= rank: dense),
    the biases, and one parameter the forward pass never uses."""

    def __init__(self, seed=0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.fc3 = torch.nn.Linear(10, 6), torch.nn.Linear(6, 9), torch.nn.Linear(9, 2)
        self.unused = torch.nn.Parameter(torch.randn(3))
        self.to(dtype)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 10, generator=g)
    return x.to(dtype), torch.stack([torch.sin(x[:, :3].sum(1)), torch.cos(x[:, 3:].sum(1))], 1).to(dtype)


LOW = dict(rank=2, update_interval=2)
FACTORIES = {
    "lorenza": lambda ps, seed: Lorenza(ps, lr=1e-2, num_probes=2, svd="exact", seed=seed, **LOW),
    "lorenza_keep": lambda ps, seed: Lorenza(ps, lr=1e-2, moment_transform="keep", svd="exact", seed=seed, **LOW),
    "lorenza_reset": lambda ps, seed: Lorenza(ps, lr=1e-2, moment_transform="reset", svd="exact", seed=seed, **LOW),
    "lorenza_per_layer": lambda ps, seed: Lorenza(ps, lr=1e-2, svd="exact", seed=seed, per_layer=True, **LOW),
    "lorenza_inplace": lambda ps, seed: Lorenza(
        ps, lr=1e-2, num_probes=2, svd="exact", seed=seed, probe="inplace", **LOW
    ),
    "lorenza_per_layer_inplace": lambda ps, seed: Lorenza(
        ps, lr=1e-2, svd="exact", seed=seed, per_layer=True, probe="inplace", **LOW
    ),
    "lorenza_plus": lambda ps, seed: LorenzaPlus(ps, lr=1e-2, svd="exact", seed=seed, **LOW),
    "galore": lambda ps, seed: GaLoreAdamW(ps, lr=1e-2, weight_decay=0.1, seed=seed, **LOW),
    "galore_per_layer": lambda ps, seed: GaLoreAdamW(ps, lr=1e-2, seed=seed, per_layer=True, **LOW),
    # lorenza_kernels' batched randomized SVD (docs/kernels.md section 3): Lorenza's default
    "lorenza_randomized": lambda ps, seed: Lorenza(ps, lr=1e-2, num_probes=2, seed=seed, **LOW),
    "galore_randomized": lambda ps, seed: GaLoreAdamW(ps, lr=1e-2, svd="randomized", seed=seed, **LOW),
}


def _run(model, opt, x, y, steps, nan_step=None):
    for s in steps:
        opt.step(mlp_closure(model, x, y, nan_at={0} if s == nan_step else None))


def _state_equal(sd_a, sd_b):
    assert sd_a["lorenza"] == sd_b["lorenza"]
    assert sd_a["state"].keys() == sd_b["state"].keys()
    for k, st in sd_b["state"].items():
        assert st.keys() == sd_a["state"][k].keys()
        for key, v in st.items():
            w = sd_a["state"][k][key]
            assert torch.equal(torch.as_tensor(w), torch.as_tensor(v)), key
            assert torch.as_tensor(w).dtype == torch.as_tensor(v).dtype


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_round_trip_across_a_refresh(name):
    """Saved after step 3 (bases built at update 1, refreshed at update 3, a skip at step 2),
    loaded into a fresh model and optimizer (other init, other seed): steps 4-7 (refresh at
    update 5) equal the uninterrupted run bitwise, state and counters included."""
    x, y = _data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref_model = Deep(seed=1)
        ref = FACTORIES[name](ref_model.parameters(), SEED)
        _run(ref_model, ref, x, y, range(7), nan_step=1)
        model = Deep(seed=1)
        opt = FACTORIES[name](model.parameters(), SEED)
        _run(model, opt, x, y, range(3), nan_step=1)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        new_model = Deep(seed=77)
        new_model.load_state_dict(ckpt["model"])
        new_opt = FACTORIES[name](new_model.parameters(), SEED + 1)
        new_opt.load_state_dict(ckpt["opt"])
        _run(new_model, new_opt, x, y, range(3, 7))
    assert_params_equal(list(new_model.parameters()), list(ref_model.parameters()))
    assert new_opt.skipped_steps == ref.skipped_steps == 1
    _state_equal(new_opt.state_dict(), ref.state_dict())
    st = ref.state[ref_model.fc1.weight]
    assert st["updates"] == 6 and st["refreshes"] == 3 and st["proj"].shape == (6, 2)


PER_LAYER = [
    pytest.param(1, "exact", id="q1-exact"),
    pytest.param(3, "exact", id="q3-exact"),
    pytest.param(1, "randomized", id="q1-randomized"),
]


@pytest.mark.parametrize("q, svd", PER_LAYER)
def test_per_layer_equals_normal_mode(q, svd):
    """Per-layer mode refreshes each basis alone in its hook (same sketch stream): same result."""
    x, y = _data()
    m_a, m_b = Deep(seed=5), Deep(seed=5)
    a = LorenzaPlus(m_a.parameters(), lr=1e-2, num_probes=q, rho=0.1, svd=svd, seed=SEED, **LOW)
    b = LorenzaPlus(m_b.parameters(), lr=1e-2, num_probes=q, rho=0.1, svd=svd, seed=SEED, per_layer=True, **LOW)
    init_unused = m_a.unused.detach().clone()
    for _ in range(5):
        a.step(mlp_closure(m_a, x, y))
        b.step(mlp_closure(m_b, x, y))
        assert all(p.grad is None for p in m_b.parameters())  # freed inside the hooks
    assert_params_equal(list(m_a.parameters()), list(m_b.parameters()))
    _state_equal(a.state_dict(), b.state_dict())
    torch.testing.assert_close(m_b.unused.detach(), init_unused, atol=1e-6, rtol=0)


def test_randomized_bases_are_reproducible():
    """Step 1's bases: the randomized range of that step's gradient (at theta: no ascent at step 1),
    sketch seed probe_seed(seed, 1, RESERVED_PROBE_BASE), planned matrix k on stream k."""
    x, y = _data()
    model, probe = Deep(seed=4), Deep(seed=4)
    opt = Lorenza(model.parameters(), lr=1e-2, oversample=3, power_iters=2, seed=SEED, **LOW)
    opt.step(mlp_closure(model, x, y))
    make_closure(lambda: torch.nn.functional.mse_loss(probe(x), y))()
    seed = probe_seed(SEED, 1, RESERVED_PROBE_BASE)
    for k, (layer, side) in enumerate(((probe.fc1, "left"), (probe.fc2, "right"))):
        kw = dict(side=side, oversample=3, power_iters=2, seed=seed, first_stream=k)
        want = lk.randomized_range(layer.weight.grad, 2, **kw)
        got = opt.state[model.fc1.weight if k == 0 else model.fc2.weight]["proj"]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.t() @ got, torch.eye(2), atol=1e-5, rtol=0)


def test_matrix_without_basis_is_not_probed():
    """Step 1 takes no probe; later steps probe every parameter that has a basis or is dense. A
    matrix that has never had a gradient has no basis: it is left exactly as it was."""
    x, y = _data()
    model = Deep(seed=2)
    model.spare = torch.nn.Parameter(torch.randn(7, 5))  # projectable (rank 2 < 5), never used
    opt = Lorenza(model.parameters(), lr=1e-2, num_probes=2, svd="exact", seed=SEED, **LOW)
    spare = model.spare.detach().clone()
    calls = []
    for _ in range(3):
        closure = mlp_closure(model, x, y)
        opt.step(lambda closure=closure: calls.append(torch.is_grad_enabled()) or closure())
    assert calls == [True] + [False] * 4 + [True] + [False] * 4 + [True]  # 2q probes from step 2
    assert torch.equal(model.spare, spare) and not opt.state.get(model.spare)


SKIP_CASES = [("lorenza", 0), ("lorenza", 3), ("lorenza", 4), ("lorenza_per_layer", 2), ("galore", 0)]


@pytest.mark.parametrize("name, call", SKIP_CASES, ids=[f"{n}-call{c}" for n, c in SKIP_CASES])
def test_non_finite_skips_the_step(name, call):
    """A NaN in a subspace probe (calls 0-3 with 2 probes) or the backward pass (call 2q): the
    subspace perturbation is removed, nothing is updated, bases and moments are untouched."""
    x, y = _data()
    model = Deep(seed=6)
    opt = FACTORIES[name](model.parameters(), SEED)
    opt.step(mlp_closure(model, x, y))  # builds the bases
    before = [p.detach().clone() for p in model.parameters()]
    state_before = copy.deepcopy(opt.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(mlp_closure(model, x, y, nan_at={call}))
        opt.step(mlp_closure(model, x, y, nan_at={call}))
    assert len([w for w in caught if "skipped" in str(w.message)]) == 1
    assert opt.skipped_steps == 2
    for p, q in zip(model.parameters(), before):
        torch.testing.assert_close(p.detach(), q, atol=2e-7, rtol=2e-7)
    state_after = opt.state_dict()
    for k, st in state_before["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(state_after["state"][k][key]), torch.as_tensor(v)), key
    assert state_after["lorenza"]["step"] == state_before["lorenza"]["step"] + 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_keep_dtype_and_fp32_state(dtype):
    x, y = _data(dtype)
    for name in ("lorenza", "lorenza_plus", "galore", "lorenza_randomized"):
        model = Deep(seed=7, dtype=dtype)
        opt = FACTORIES[name](model.parameters(), SEED)
        before = [p.detach().clone() for p in model.parameters()]
        for _ in range(4):
            assert torch.isfinite(opt.step(mlp_closure(model, x, y)))
        assert all(p.dtype == dtype for p in model.parameters())
        assert not torch.equal(before[0], model.fc1.weight) and not torch.equal(before[2], model.fc2.weight)
        assert "proj" in opt.state[model.fc1.weight]
        for st in opt.state.values():
            assert all(v.dtype == torch.float32 for v in st.values() if isinstance(v, torch.Tensor)), name


def test_lr_scheduler_drives_the_step():
    x, y = _data()
    for name in ("lorenza", "galore"):
        m_a, m_b = Deep(seed=9), Deep(seed=9)
        a, b = FACTORIES[name](m_a.parameters(), SEED), FACTORIES[name](m_b.parameters(), SEED)
        sched = torch.optim.lr_scheduler.LambdaLR(a, lambda s: 0.5**s)
        for s in range(4):
            a.step(mlp_closure(m_a, x, y))
            sched.step()
            b.param_groups[0]["lr"] = 1e-2 * 0.5**s
            b.step(mlp_closure(m_b, x, y))
        assert_params_equal(list(m_a.parameters()), list(m_b.parameters()))


def test_state_bytes_match_the_memory_table():
    """docs/algorithms.md: Q + 2 r max(m, n) per projected matrix (float32; LORENZA's singular probes add
    the other side's r max(m, n) singular vectors), AdamW's 2 x params for the rest; no state tensor of a
    projected matrix has m x n elements."""
    x, y = _data()
    for name in ("lorenza", "galore", "lorenza_per_layer"):
        model = Deep(seed=10)
        opt = FACTORIES[name](model.parameters(), SEED)
        opt.step(mlp_closure(model, x, y))
        expected = 0
        for p in model.parameters():
            if p is model.unused:
                assert not opt.state.get(p)  # no gradient, no state
                continue
            m, n = p.shape[0], math.prod(p.shape[1:]) if p.dim() > 1 else 1
            if p.dim() == 2 and min(m, n) > LOW["rank"]:
                r = LOW["rank"]
                keys = {"step", "updates", "refreshes", "proj", "exp_avg", "exp_avg_sq"}
                if name.startswith("lorenza"):  # the paper's probes: the other side's singular vectors
                    expected += 4 * (min(m, n) * r + 3 * r * max(m, n))
                    keys.add("factor")
                else:
                    expected += 4 * (min(m, n) * r + 2 * r * max(m, n))
                assert set(opt.state[p]) == keys
                assert all(v.numel() < p.numel() for v in opt.state[p].values() if isinstance(v, torch.Tensor))
            else:
                expected += 4 * 2 * p.numel()
                assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
        assert opt.state_bytes() == expected, name


BAD = [
    (lambda ps: Lorenza(ps, rank=0), ValueError, "rank"),
    (lambda ps: Lorenza(ps, rank=-2), ValueError, "rank"),
    (lambda ps: Lorenza(ps, rank=2.0), TypeError, "rank"),
    (lambda ps: Lorenza(ps, update_interval=0), ValueError, "update_interval"),
    (lambda ps: Lorenza(ps, moment_transform="rotat"), ValueError, "moment_transform"),
    (lambda ps: Lorenza(ps, svd="full"), ValueError, "svd"),
    (lambda ps: Lorenza(ps, lr=-1e-3), ValueError, "lr"),
    (lambda ps: Lorenza(ps, rho=-0.1), ValueError, "rho"),
    (lambda ps: Lorenza(ps, mu=-1e-3), ValueError, "mu"),
    (lambda ps: Lorenza(ps, mu=0.0), ValueError, "mu"),
    (lambda ps: Lorenza(ps, scale=-1.0), ValueError, "scale"),
    (lambda ps: Lorenza(ps, residual_scale=-0.1), ValueError, "residual_scale"),
    (lambda ps: Lorenza(ps, oversample=-1), ValueError, "oversample"),
    (lambda ps: Lorenza(ps, power_iters=-1), ValueError, "power_iters"),
    (lambda ps: Lorenza(ps, num_probes=0), ValueError, "num_probes"),
    (lambda ps: LorenzaPlus(ps, scale=float("nan")), ValueError, "scale"),
    (lambda ps: Lorenza([{"params": ps, "proj_type": "std"}]), ValueError, "proj_type"),
]


@pytest.mark.parametrize("build, exc, match", BAD, ids=[f"case{i}" for i in range(len(BAD))])
def test_bad_construction(build, exc, match):
    with pytest.raises(exc, match=match):
        build(list(Deep().parameters()))


def test_bad_changes_after_construction_modify_nothing():
    x, y = _data()
    model = Deep(seed=3)
    opt = Lorenza(model.parameters(), lr=1e-2, svd="exact", **LOW)
    opt.step(mlp_closure(model, x, y))
    before = [p.detach().clone() for p in model.parameters()]
    for key, value, exc in (("rank", 3, ValueError), ("rank", None, ValueError), ("update_interval", 0, ValueError)):
        group = opt.param_groups[0]
        old, group[key] = group[key], value
        with pytest.raises(exc, match=key if key != "rank" else "rank.*changed|rank"):
            opt.step(mlp_closure(model, x, y))
        group[key] = old
        assert_params_equal(list(model.parameters()), before)
        assert opt.global_step == 1
    sd = opt.state_dict()
    sd["lorenza"]["moment_transform"] = "spin"
    with pytest.raises(ValueError, match="moment_transform"):
        opt.load_state_dict(sd)
