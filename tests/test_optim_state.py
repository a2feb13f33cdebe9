"""State dict round trip mid-run, per-layer mode, non-finite skips, bf16 parameters, LR schedulers."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from _optim_common import MLP, SEED, assert_params_equal, mlp_closure, mlp_data, params_of, single_thread  # noqa: F401

from lorenza.optim import SAM, AdaZoSAM, Loren, MeZO, MeZOAdam

FACTORIES = {
    "mezo": lambda ps, seed: MeZO(ps, lr=1e-2, num_probes=2, seed=seed),
    "mezo_adam": lambda ps, seed: MeZOAdam(ps, lr=1e-2, seed=seed),
    "adazo_sam": lambda ps, seed: AdaZoSAM(ps, lr=1e-2, num_probes=2, seed=seed),
    "adazo_sam_per_layer": lambda ps, seed: AdaZoSAM(ps, lr=1e-2, num_probes=2, seed=seed, per_layer=True),
    "loren": lambda ps, seed: Loren(ps, lr=1e-2, num_queries=3, lr_cov=1.0, seed=seed),
    "mezo_inplace": lambda ps, seed: MeZO(ps, lr=1e-2, num_probes=2, seed=seed, probe="inplace"),
    "adazo_sam_inplace": lambda ps, seed: AdaZoSAM(ps, lr=1e-2, num_probes=2, seed=seed, probe="inplace"),
    "adazo_sam_per_layer_inplace": lambda ps, seed: AdaZoSAM(
        ps, lr=1e-2, num_probes=2, seed=seed, per_layer=True, probe="inplace"
    ),
    "loren_inplace": lambda ps, seed: Loren(ps, lr=1e-2, num_queries=3, lr_cov=1.0, seed=seed, probe="inplace"),
    "sam": lambda ps, seed: SAM(ps, torch.optim.AdamW, rho=0.05, lr=1e-2),
}

pytestmark = pytest.mark.usefixtures("single_thread")


def _run(model, opt, x, y, steps, nan_step=None):
    for s in steps:
        opt.step(mlp_closure(model, x, y, nan_at={0} if s == nan_step else None))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_round_trip_is_bit_identical(name):
    x, y = mlp_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the skip at step 1
        ref_model = MLP(seed=1)
        ref = FACTORIES[name](ref_model.groups(), SEED)
        _run(ref_model, ref, x, y, range(6), nan_step=1)

        model = MLP(seed=1)
        opt = FACTORIES[name](model.groups(), SEED)
        _run(model, opt, x, y, range(3), nan_step=1)
        buf = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True)
        # A fresh process would build a new model and optimizer (here: another init and seed).
        new_model = MLP(seed=77)
        new_model.load_state_dict(ckpt["model"])
        new_opt = FACTORIES[name](new_model.groups(), SEED + 1)
        new_opt.load_state_dict(ckpt["opt"])
        _run(new_model, new_opt, x, y, range(3, 6))
    assert_params_equal(params_of(new_model), params_of(ref_model))
    assert new_opt.skipped_steps == ref.skipped_steps == 1
    sd_new, sd_ref = new_opt.state_dict(), ref.state_dict()
    assert sd_new["lorenza"] == sd_ref["lorenza"]
    for k, st in sd_ref["state"].items():
        for key, v in st.items():
            w = sd_new["state"][k][key]
            assert torch.equal(torch.as_tensor(w), torch.as_tensor(v))
            if isinstance(v, torch.Tensor):
                assert w.dtype == v.dtype


@pytest.mark.parametrize("q", [1, 3])
def test_per_layer_equals_normal_mode(q):
    x, y = mlp_data()
    m_a, m_b = MLP(seed=5), MLP(seed=5)
    a = AdaZoSAM(m_a.groups(), lr=1e-2, num_probes=q, rho=0.1, seed=SEED)
    b = AdaZoSAM(m_b.groups(), lr=1e-2, num_probes=q, rho=0.1, seed=SEED, per_layer=True)
    init_unused = m_a.unused.detach().clone()
    for _ in range(4):
        a.step(mlp_closure(m_a, x, y))
        b.step(mlp_closure(m_b, x, y))
        assert all(p.grad is None for p in m_b.parameters())  # freed inside the hooks
    assert_params_equal(params_of(m_a), params_of(m_b))
    for pa, pb in zip(m_a.parameters(), m_b.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            if pa in a.state:
                assert torch.equal(a.state[pa][key], b.state[pb][key])
    # The unused parameter gets no gradient: its perturbation is removed after the backward pass.
    torch.testing.assert_close(m_b.unused.detach(), init_unused, atol=1e-6, rtol=0)


def test_per_layer_trains_parameters_made_trainable_later():
    """A parameter frozen at construction has no hook; once trainable it is updated after the
    backward pass, as in normal mode."""
    x, y = mlp_data()
    models = [MLP(seed=5), MLP(seed=5)]
    opts = []
    for model, per_layer in zip(models, (False, True)):
        model.fc2.bias.requires_grad_(False)
        opts.append(AdaZoSAM(model.parameters(), lr=1e-2, seed=SEED, per_layer=per_layer))
        model.fc2.bias.requires_grad_(True)
    for model, opt in zip(models, opts):
        for _ in range(2):
            opt.step(mlp_closure(model, x, y))
    assert not torch.equal(models[1].fc2.bias, MLP(seed=5).fc2.bias)
    assert_params_equal(params_of(models[0]), params_of(models[1]))


SKIP_CASES = [
    ("mezo", 0),  # first probe
    ("mezo", 3),  # last probe (q = 2)
    ("mezo_adam", 1),
    ("adazo_sam", 0),
    ("adazo_sam", 4),  # the backward pass (after 2 q = 4 probes)
    ("adazo_sam_per_layer", 4),
    ("loren", 2),
    ("sam", 0),  # the first backward pass
    ("sam", 1),  # the second
]


@pytest.mark.parametrize("name, call", SKIP_CASES, ids=[f"{n}-call{c}" for n, c in SKIP_CASES])
def test_non_finite_skips_the_step(name, call):
    x, y = mlp_data()
    model = MLP(seed=6)
    opt = FACTORIES[name](model.groups(), SEED)
    opt.step(mlp_closure(model, x, y))  # a normal step first, so there is state to protect
    before = params_of(model)
    state_before = copy.deepcopy(opt.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(mlp_closure(model, x, y, nan_at={call}))
        opt.step(mlp_closure(model, x, y, nan_at={call}))
    skips = [w for w in caught if "skipped" in str(w.message)]
    assert len(skips) == 1 and issubclass(skips[0].category, RuntimeWarning)
    assert opt.skipped_steps == 2
    after = params_of(model)
    if name == "sam":  # restored from copies: bitwise
        assert_params_equal(after, before)
    else:
        # Restored by regenerating and subtracting the noise: exact up to the rounding of the
        # additions (a bitwise restore would need a parameter copy, which the memory table forbids).
        for p, q in zip(after, before):
            torch.testing.assert_close(p, q, atol=2e-7, rtol=2e-7)
    state_after = opt.state_dict()
    for k, st in state_before["state"].items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(state_after["state"][k][key]), torch.as_tensor(v)), key
    if "lorenza" in state_before and "step" in state_before["lorenza"]:
        assert state_after["lorenza"]["step"] == state_before["lorenza"]["step"] + 2  # fresh noise next time


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_params_keep_dtype_and_fp32_state(dtype):
    x, y = mlp_data()
    for name in ("mezo", "mezo_adam", "adazo_sam", "loren"):
        model = MLP(seed=7, dtype=dtype)
        opt = FACTORIES[name](model.groups(), SEED)
        before = params_of(model)
        for _ in range(3):
            loss = opt.step(mlp_closure(model, x.to(dtype), y.to(dtype)))
            assert torch.isfinite(loss)
        assert all(p.dtype == dtype for p in model.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, params_of(model)))
        for st in opt.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    assert v.dtype == torch.float32, name


@pytest.mark.parametrize("stochastic", [False, True], ids=["nearest", "stochastic"])
def test_bf16_adamw_update_rounds_once_from_fp32(stochastic):
    """AdaZo-SAM (rho = 0) on bf16: the fp32 AdamW update of the fp32 image, rounded once: to
    nearest, or stochastically to one of the two bfloat16 neighbours of the float32 value."""
    x, y = mlp_data(dtype=torch.bfloat16)
    model = MLP(seed=8, dtype=torch.bfloat16)
    ref_model = copy.deepcopy(model)
    opt = AdaZoSAM(model.parameters(), lr=1e-2, rho=0.0, weight_decay=0.1, stochastic_rounding=stochastic)
    opt.step(mlp_closure(model, x, y))
    mlp_closure(ref_model, x, y)()  # bf16 gradients, as the optimizer saw them
    masters = [p.detach().float().clone().requires_grad_() for p in ref_model.parameters()]
    for m, p in zip(masters, ref_model.parameters()):
        m.grad = None if p.grad is None else p.grad.float()
    torch.optim.AdamW(masters, lr=1e-2, weight_decay=0.1, foreach=False).step()
    moved = 0
    for p, m in zip(model.parameters(), masters):
        if not stochastic:
            assert torch.equal(p.detach(), m.detach().bfloat16())
            continue
        v = m.detach()
        near = v.bfloat16().float()
        down, up = (torch.tensor(x, dtype=torch.bfloat16) for x in (-1e30, 1e30))
        other = torch.where(near > v, torch.nextafter(near.bfloat16(), down), torch.nextafter(near.bfloat16(), up))
        other = other.float()
        got = p.detach().float()
        assert bool(((got == near) | ((got == other) & (near != v))).all())
        moved += int((got != near).sum())
    assert not stochastic or moved > 0  # some elements rounded away from the nearest value


def test_lr_scheduler_drives_the_step():
    x, y = mlp_data()
    for name in ("mezo", "adazo_sam", "loren"):
        m_a, m_b = MLP(seed=9), MLP(seed=9)
        a, b = FACTORIES[name](m_a.groups(), SEED), FACTORIES[name](m_b.groups(), SEED)
        sched = torch.optim.lr_scheduler.LambdaLR(a, lambda s: 0.5**s)
        for s in range(4):
            a.step(mlp_closure(m_a, x, y))
            sched.step()
            for g in b.param_groups:
                g["lr"] = 1e-2 * 0.5**s
            b.step(mlp_closure(m_b, x, y))
        assert sched.get_last_lr() == [1e-2 * 0.5**4] * 2
        assert_params_equal(params_of(m_a), params_of(m_b))


def test_state_layout_matches_the_memory_table():
    """docs/algorithms.md's table: MeZO none; MeZO-Adam, AdaZo-SAM two moments; LOREN momentum for
    matrices plus the vectors a (and the scalar cov_step, the last covariance step's size); SAM
    the base optimizer's state (its copies live only in a step)."""
    x, y = mlp_data()
    expected = {
        "mezo": lambda p: set(),
        "mezo_adam": lambda p: {"step", "exp_avg", "exp_avg_sq"},
        "adazo_sam": lambda p: {"step", "exp_avg", "exp_avg_sq"},
        "loren": lambda p: {"a", "cov_step", "momentum_buffer"} if p.dim() >= 2 else {"a", "cov_step"},
        "sam": lambda p: {"step", "exp_avg", "exp_avg_sq"},
    }
    for name, keys in expected.items():
        model = MLP(seed=10)
        opt = FACTORIES[name](model.groups(), SEED)
        opt.step(mlp_closure(model, x, y))
        state = opt.base_optimizer.state if name == "sam" else opt.state
        assert not (name == "sam" and any(opt.state.values()))
        for p in model.parameters():
            if p is model.unused and name in ("mezo_adam", "adazo_sam", "sam"):
                continue  # AdamW keeps no state for a parameter that never had a gradient
            assert set(state.get(p, {})) == keys(p), (name, p.shape)
            if name == "loren":
                assert state[p]["a"].shape == (p.shape[-1] if p.dim() == 2 else p.numel(),)
                assert state[p]["cov_step"].shape == ()
