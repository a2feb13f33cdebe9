"""SAM against its formula and davda54's calling convention; exact reductions to the base optimizers:
SAM with rho = 0 is its base optimizer, AdaZo-SAM with rho = 0 is torch.optim.AdamW."""

from __future__ import annotations

import pytest
import torch
from _optim_common import MLP, Problem, mlp_closure, mlp_data, single_thread  # noqa: F401

from lorenza.optim import SAM, AdaZoSAM

SHAPES = [(4, 3), (3,), (2, 3, 2)]

pytestmark = pytest.mark.usefixtures("single_thread")


def test_sam_matches_formula():
    problem = Problem(SHAPES, gen_seed=5)
    params = problem.params()
    rho, lr, mom = 0.05, 0.1, 0.9
    opt = SAM(params, torch.optim.SGD, rho=rho, lr=lr, momentum=mom)
    theta = [x.float().double() for x in problem.init]
    buf = None
    for _ in range(4):
        opt.step(problem.closure(params))
        at = [p.clone().requires_grad_() for p in theta]
        g1 = torch.autograd.grad(problem.loss(at), at)
        norm = torch.sqrt(sum(g.square().sum() for g in g1))
        at = [(p + rho * g / (norm + 1e-12)).requires_grad_() for p, g in zip(theta, g1)]
        g2 = torch.autograd.grad(problem.loss(at), at)
        buf = list(g2) if buf is None else [mom * b + g for b, g in zip(buf, g2)]
        theta = [p - lr * b for p, b in zip(theta, buf)]
        for p, ref in zip(params, theta):
            torch.testing.assert_close(p.detach().double(), ref, atol=2e-6, rtol=1e-5)
    assert all(p.grad is None for p in params)  # step(closure) frees the gradients
    assert all("old_p" not in opt.state[p] for p in params)  # the copies live only during a step


def test_sam_davda54_convention_equals_step_closure():
    """``loss.backward(); first_step(zero_grad=True); closure-backward; second_step()`` and
    ``loss.backward(); step(closure)`` (davda54's README) and ``step(closure)`` alone agree."""
    x, y = mlp_data()
    models = [MLP(seed=4) for _ in range(3)]
    opts = [SAM(m.parameters(), torch.optim.AdamW, rho=0.1, lr=1e-2, weight_decay=0.01) for m in models]
    for _ in range(3):
        # manual first/second step
        torch.nn.functional.mse_loss(models[0](x), y).backward()
        opts[0].first_step(zero_grad=True)
        torch.nn.functional.mse_loss(models[0](x), y).backward()
        opts[0].second_step(zero_grad=True)
        # backward by the caller, then step(closure)
        torch.nn.functional.mse_loss(models[1](x), y).backward()
        opts[1].step(mlp_closure(models[1], x, y))
        # the closure protocol only
        opts[2].step(mlp_closure(models[2], x, y))
    for a, b, c in zip(*(m.parameters() for m in models)):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize(
    "base, kwargs",
    [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)), (torch.optim.AdamW, dict(lr=1e-2))],
    ids=["SGD", "AdamW"],
)
def test_sam_rho0_is_base_optimizer(base, kwargs):
    x, y = mlp_data()
    m_sam, m_base = MLP(seed=2), MLP(seed=2)
    sam = SAM(m_sam.groups(), base, rho=0.0, **kwargs)
    ref = base(m_base.groups(), **kwargs)
    for _ in range(5):
        sam.step(mlp_closure(m_sam, x, y))
        ref.zero_grad()
        with torch.enable_grad():
            mlp_closure(m_base, x, y)()
        ref.step()
    for a, b in zip(m_sam.parameters(), m_base.parameters()):
        assert torch.equal(a, b)
    sd_sam, sd_ref = sam.state_dict(), ref.state_dict()
    for k, st in sd_ref["state"].items():
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(sd_sam["state"][k][name]), torch.as_tensor(v))


@pytest.mark.parametrize("per_layer", [False, True], ids=["normal", "per_layer"])
@pytest.mark.parametrize("foreach", [False, None], ids=["single_tensor", "default"])
def test_adazo_sam_rho0_is_adamw(per_layer, foreach):
    x, y = mlp_data()
    m_zo, m_ref = MLP(seed=3), MLP(seed=3)
    hp = dict(lr=1e-2, betas=(0.85, 0.995), eps=1e-7)
    zo = AdaZoSAM(m_zo.groups(0.05), rho=0.0, per_layer=per_layer, **hp)
    ref = torch.optim.AdamW(m_ref.groups(0.05), foreach=foreach, **hp)
    calls = {"n": 0}
    inner = mlp_closure(m_zo, x, y)

    def counting():
        calls["n"] += 1
        return inner()

    for _ in range(6):
        zo.step(counting)
        ref.zero_grad()
        with torch.enable_grad():
            mlp_closure(m_ref, x, y)()
        ref.step()
    assert calls["n"] == 6  # rho = 0: no probe, one backward per step
    for a, b in zip(m_zo.parameters(), m_ref.parameters()):
        if a is m_zo.unused:  # no gradient: neither optimizer touches it
            assert torch.equal(a, b)
            continue
        if foreach is False:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-6)
    ref_state = ref.state[m_ref.fc1.weight]
    zo_state = zo.state[m_zo.fc1.weight]
    assert zo_state["step"] == int(ref_state["step"])
    torch.testing.assert_close(
        zo_state["exp_avg_sq"], ref_state["exp_avg_sq"], atol=0, rtol=1e-6 if foreach is None else 0
    )
