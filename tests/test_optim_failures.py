"""A step that raises leaves the parameters and the optimizer state bitwise as they were.

Every optimizer, a failure injected at each call of the closure in turn (an exception, or a return
value that is not a loss), before and after the state exists. Per-layer mode updates parameters in
the backward pass itself, so there the failure is injected before the backward pass
(``docs/algorithms.md``, "Exceptions")."""

from __future__ import annotations

import copy

import pytest
import torch
from _optim_common import SEED, single_thread  # noqa: F401
from torch import nn

from lorenza.optim import SAM, AdaZoSAM, GaLoreAdamW, Loren, Lorenza, LorenzaPlus, MeZO, MeZOAdam

pytestmark = pytest.mark.usefixtures("single_thread")

LOW = dict(rank=3, update_interval=2)
FACTORIES = {
    "mezo": lambda ps: MeZO(ps, lr=1e-2, num_probes=2, seed=SEED),
    "mezo_adam": lambda ps: MeZOAdam(ps, lr=1e-2, seed=SEED),
    "adazo_sam": lambda ps: AdaZoSAM(ps, lr=1e-2, num_probes=2, seed=SEED),
    "adazo_sam_momentum": lambda ps: AdaZoSAM(ps, lr=1e-2, probe_space="momentum", seed=SEED),
    "adazo_sam_per_layer": lambda ps: AdaZoSAM(ps, lr=1e-2, seed=SEED, per_layer=True),
    "lorenza": lambda ps: Lorenza(ps, lr=1e-2, num_probes=2, seed=SEED, **LOW),
    "lorenza_subspace": lambda ps: Lorenza(ps, lr=1e-2, probe_space="subspace", seed=SEED, **LOW),
    "lorenza_plus_per_layer": lambda ps: LorenzaPlus(ps, lr=1e-2, seed=SEED, per_layer=True, **LOW),
    "galore": lambda ps: GaLoreAdamW(ps, lr=1e-2, svd="randomized", seed=SEED, **LOW),
    "loren": lambda ps: Loren(ps, lr=1e-2, num_queries=3, lr_cov=1.0, seed=SEED),
    "sam": lambda ps: SAM(ps, torch.optim.AdamW, rho=0.05, lr=1e-2),
}


class Boom(RuntimeError):
    pass


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))


def _closure(model, x, y, fail_at=None, how="raise", calls=None):
    """The closure protocol; at call ``fail_at`` (from 0) it raises, or returns something that is
    not a loss (before any backward pass either way)."""
    calls = calls if calls is not None else {"n": 0}

    def closure():
        k = calls["n"]
        calls["n"] += 1
        if k == fail_at:
            if how == "raise":
                raise Boom(f"injected at call {k}")
            return "not a loss"
        loss = nn.functional.mse_loss(model(x), y)
        if torch.is_grad_enabled():
            loss.backward()
        return loss.detach()

    return closure, calls


def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _assert_same(model, opt, snap):
    params, sd = snap
    for a, b in zip(model.parameters(), params):
        assert torch.equal(a.detach(), b)
    now = opt.state_dict()
    assert now.get("lorenza") == sd.get("lorenza")
    assert set(now["state"]) == set(sd["state"])
    for k, st in sd["state"].items():
        assert set(now["state"][k]) == set(st)
        for key, v in st.items():
            w = now["state"][k][key]
            assert torch.equal(torch.as_tensor(w), torch.as_tensor(v)), (k, key)


@pytest.mark.parametrize("how", ["raise", "not a loss"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_a_failing_closure_changes_nothing(name, how):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
    model = _model()
    opt = FACTORIES[name](model.parameters())
    per_layer = getattr(opt, "per_layer", False)
    for warm in range(3):  # step 0: no state yet; then with state (and Lorenza's bases, a refresh)
        closure, calls = _closure(model, x, y)
        probe = copy.deepcopy((model, opt))  # one copy: the optimizer keeps the model's parameters
        probe[1].step(_closure(probe[0], x, y, calls=calls)[0])  # how many calls a step makes
        n_calls = calls["n"]
        del probe
        fail_points = range(n_calls - 1) if per_layer else range(n_calls)  # per-layer: before backward
        for k in fail_points:
            snap = _snapshot(model, opt)
            bad, _ = _closure(model, x, y, fail_at=k, how=how)
            exc = Boom if how == "raise" else TypeError
            with pytest.raises(exc):
                opt.step(bad)
            _assert_same(model, opt, snap)
        opt.step(closure)  # the optimizer still works after the failures
        assert all(torch.isfinite(p).all() for p in model.parameters())
        del warm


@pytest.mark.parametrize("name", ["mezo", "adazo_sam", "lorenza", "galore"])
def test_model_outputs_are_losses(name):
    # A closure may return what a Hugging Face model returns (an object with .loss), or a tuple
    # starting with the loss: the same step as returning the loss itself.
    class Output:
        def __init__(self, loss):
            self.loss, self.logits = loss, None

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
    results = []
    for wrap in (lambda loss: loss, Output, lambda loss: (loss, None), lambda loss: {"loss": loss}):
        model = _model()
        opt = FACTORIES[name](model.parameters())
        from lorenza.optim import make_closure

        for _ in range(3):
            out = opt.step(make_closure(lambda model=model, wrap=wrap: wrap(nn.functional.mse_loss(model(x), y))))
            assert isinstance(out, torch.Tensor) and out.ndim == 0
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
