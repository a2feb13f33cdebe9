"""GaLoreAdamW: the identity-basis reduction to AdamW, galore-torch's GaLoreAdamW step for step,
its group keys, and per-layer mode driven by the user's own backward pass."""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from _optim_common import assert_params_equal, single_thread  # noqa: F401

from lorenza.optim import GaLoreAdamW, Lorenza, make_closure

pytestmark = pytest.mark.usefixtures("single_thread")


class Diagonal(torch.nn.Module):
    """Loss of ``W``'s first ``k`` diagonal entries only, with distinct curvatures: the gradient is
    diagonal with ``k`` distinct non-zero singular values, so the exact rank-``k`` SVD basis is a
    signed selection of unit vectors and projected Adam must equal dense Adam on those entries."""

    def __init__(self, m, n, k):
        super().__init__()
        g = torch.Generator().manual_seed(m * 100 + n)
        self.w = torch.nn.Parameter(torch.randn(m, n, generator=g))
        self.k = k
        self.target = torch.randn(k, generator=g)
        self.curv = torch.linspace(1.0, 3.0, k)

    def forward(self):
        d = torch.diagonal(self.w)[: self.k]
        return (self.curv * (d - self.target) ** 2).sum() + 0.1 * torch.sin(3 * d).sum()


@pytest.mark.parametrize("shape", [(10, 7), (6, 9)], ids=["right", "left"])
@pytest.mark.parametrize("name", ["galore", "lorenza_rho0"])
def test_identity_basis_reduces_to_adamw_times_scale(shape, name):
    """With the exact SVD the basis is the identity on the live coordinates: the projected update
    is torch.optim.AdamW's with lr * scale (eps tiny so that galore-torch's eps placement is moot)."""
    k, lr, scale = 3, 0.05, 0.25
    model, ref = Diagonal(*shape, k), Diagonal(*shape, k)
    kw = dict(lr=lr, rank=k, update_interval=2, scale=scale, eps=1e-12, betas=(0.9, 0.99))
    if name == "galore":
        opt = GaLoreAdamW(model.parameters(), **kw)
    else:
        opt = Lorenza(model.parameters(), rho=0.0, svd="exact", moment_transform="keep", **kw)
    adamw = torch.optim.AdamW(ref.parameters(), lr=lr * scale, eps=1e-12, betas=(0.9, 0.99), weight_decay=0.0)
    for _ in range(7):  # refreshes at updates 0, 2, 4, 6
        if name == "galore":  # drop-in usage: the user's backward, then step()
            opt.zero_grad()
            model().backward()
            opt.step()
        else:
            opt.step(make_closure(model))
        adamw.zero_grad()
        ref().backward()
        adamw.step()
        torch.testing.assert_close(model.w, ref.w, atol=1e-6, rtol=1e-6)
    assert opt.state[model.w]["refreshes"] == 4 and opt.state[model.w]["proj"].shape[1] == k
    assert not torch.equal(model.w, Diagonal(*shape, k).w)


def _galore_torch():
    if importlib.util.find_spec("galore_torch") is None:
        pytest.skip("galore_torch is not installed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import galore_torch
        except Exception as exc:  # noqa: BLE001  (an optional dependency that fails to import)
            pytest.skip(f"galore_torch does not import: {exc}")
    return galore_torch.GaLoreAdamW


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = torch.nn.Linear(20, 14)  # 14 x 20: left side
        self.fc2 = torch.nn.Linear(14, 18)  # 18 x 14: right side
        self.fc3 = torch.nn.Linear(18, 3)  # 3 x 18: min(m, n) = 3 <= rank 4 -> kept out of GaLore

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))))

    def galore_groups(self, **galore):
        lowrank = [self.fc1.weight, self.fc2.weight]
        rest = [p for p in self.parameters() if all(p is not q for q in lowrank)]
        return [{"params": rest}, {"params": lowrank, **galore}]


def _data(n=48):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, 20, generator=g)
    return x, torch.sin(x[:, :3] * 1.5) + 0.1 * x[:, 3:6]


def test_matches_galore_torch():
    ref_cls = _galore_torch()
    x, y = _data()
    galore = dict(rank=4, update_proj_gap=5, scale=0.25, proj_type="std")
    ours_model, ref_model = Net(), Net()
    ours = GaLoreAdamW(ours_model.galore_groups(**galore), lr=1e-2, weight_decay=0.05, svd="exact")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # galore-torch's transformers-AdamW notice
        ref = ref_cls(ref_model.galore_groups(**galore), lr=1e-2, weight_decay=0.05)
    for step in range(20):
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        for a, b in zip(ours_model.parameters(), ref_model.parameters()):
            err = float((a - b).detach().norm() / b.detach().norm())
            assert err < 1e-4, (step, tuple(a.shape), err)
    assert ours.state[ours_model.fc1.weight]["proj"].shape == (14, 4)  # left: m < n
    assert ours.state[ours_model.fc2.weight]["proj"].shape == (14, 4)  # right: Q is n x r
    assert ours.state[ours_model.fc1.weight]["refreshes"] == 4  # updates 0, 5, 10, 15
    assert ours.state[ours_model.fc3.weight]["exp_avg"].shape == (3, 18)  # dense
    assert ours.param_groups[1]["update_interval"] == 5 and "update_proj_gap" not in ours.param_groups[1]


def test_galore_group_conventions():
    model = Net()
    # galore-style groups: a group without 'rank' is dense, whatever the rank argument says.
    opt = GaLoreAdamW(model.galore_groups(rank=4, update_proj_gap=3), rank=2)
    assert opt.param_groups[0]["rank"] is None and opt.param_groups[1]["rank"] == 4
    # plain parameters: the rank argument applies to every matrix with min(m, n) > rank.
    opt = GaLoreAdamW(model.parameters(), rank=4, update_interval=3)
    x, y = _data()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    assert "proj" in opt.state[model.fc1.weight] and "proj" not in opt.state[model.fc3.weight]
    for kw, exc, match in [
        (dict(proj_type="reverse_std"), ValueError, "proj_type.*only 'std'"),
        (dict(proj_type="diagonal"), ValueError, "proj_type"),
        (dict(update_proj_gap=3, update_interval=4), ValueError, "update_proj_gap"),
        (dict(rank=0), ValueError, "rank"),
        (dict(rank=2.5), TypeError, "rank"),
        (dict(update_proj_gap=0), ValueError, "update_interval"),
    ]:
        with pytest.raises(exc, match=match):
            GaLoreAdamW(Net().galore_groups(**{"rank": 4, **kw}))
    for kw, exc, match in [
        (dict(svd="lanczos"), ValueError, "svd"),
        (dict(lr=-1.0), ValueError, "lr"),
        (dict(scale=-0.5), ValueError, "scale"),
        (dict(rank=-3), ValueError, "rank"),
        (dict(eps=-1.0), ValueError, "eps"),
    ]:
        with pytest.raises(exc, match=match):
            GaLoreAdamW(Net().parameters(), **kw)


@pytest.mark.parametrize("with_closure", [False, True])
def test_per_layer_equals_normal_mode(with_closure):
    """Per-layer mode: the user's backward drives the updates (gradients freed in the hooks);
    step() closes the step. Same parameters and state as normal mode, bitwise."""
    x, y = _data()
    models = [Net(), Net()]
    opts = [
        GaLoreAdamW(m.parameters(), lr=1e-2, rank=3, update_interval=3, weight_decay=0.1, per_layer=pl)
        for m, pl in zip(models, (False, True))
    ]
    for _ in range(7):
        for model, opt in zip(models, opts):
            loss_fn = lambda model=model: torch.nn.functional.mse_loss(model(x), y)  # noqa: E731
            if with_closure:
                opt.step(lambda: loss_fn().backward())
            else:
                opt.zero_grad()
                loss_fn().backward()
                opt.step()
        assert all(p.grad is None for p in models[1].parameters())
    assert_params_equal(list(models[0].parameters()), list(models[1].parameters()))
    for pa, pb in zip(models[0].parameters(), models[1].parameters()):
        for key, v in opts[0].state[pa].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(opts[1].state[pb][key])), key
    # A second backward before step() would accumulate: per-layer mode refuses it.
    torch.nn.functional.mse_loss(models[1](x), y).backward()
    with pytest.raises(RuntimeError, match="twice"):
        torch.nn.functional.mse_loss(models[1](x), y).backward()


def test_non_finite_gradient_skips():
    x, y = _data()
    model = Net()
    opt = GaLoreAdamW(model.parameters(), lr=1e-2, rank=3, update_interval=2)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: {kk: torch.as_tensor(vv).clone() for kk, vv in v.items()} for k, v in opt.state_dict()["state"].items()}
    opt.zero_grad()
    (torch.nn.functional.mse_loss(model(x), y) * float("nan")).backward()
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert_params_equal(list(model.parameters()), before)
    assert opt.skipped_steps == 1
    for k, st in opt.state_dict()["state"].items():
        for kk, v in st.items():
            assert torch.equal(torch.as_tensor(v), state[k][kk])
