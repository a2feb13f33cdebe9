"""Every optimizer lowers the held-out loss of two small real problems within a fixed budget.

Least squares (8 features, 96 train / 32 held-out rows) and a 4-8-1 tanh MLP regression
(128 / 32). Run with ``-s`` to see the held-out losses.
"""

from __future__ import annotations

import pytest
import torch
from _optim_common import SEED, single_thread  # noqa: F401

from lorenza.optim import SAM, AdaZoSAM, Loren, MeZO, MeZOAdam, make_closure

pytestmark = pytest.mark.usefixtures("single_thread")


def least_squares():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(128, 8, generator=g)
    y = a @ torch.randn(8, 1, generator=g) + 0.05 * torch.randn(128, 1, generator=g)
    return (a[:96], y[:96]), (a[96:], y[96:]), lambda: torch.nn.Linear(8, 1)


def mlp_regression():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(160, 4, generator=g)
    y = torch.sin(x @ torch.tensor([[1.0], [-1.0], [0.5], [0.3]])) + 0.3 * x[:, :1] ** 2
    net = lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))  # noqa: E731
    return (x[:128], y[:128]), (x[128:], y[128:]), net


PROBLEMS = {"least_squares": least_squares, "mlp": mlp_regression}
# (factory, steps): budgets fixed per optimizer; a zeroth-order step costs 2q or K forwards.
OPTIMIZERS = {
    "MeZO": (lambda ps: MeZO(ps, lr=0.03, mu=1e-2, seed=SEED), 120),
    "MeZOAdam": (lambda ps: MeZOAdam(ps, lr=0.05, mu=1e-2, seed=SEED), 120),
    "AdaZoSAM": (lambda ps: AdaZoSAM(ps, lr=0.05, rho=0.05, seed=SEED), 50),
    "SAM-AdamW": (lambda ps: SAM(ps, torch.optim.AdamW, rho=0.05, lr=0.05), 50),
    "Loren": (lambda ps: Loren(ps, lr=0.01, mu=1e-2, num_queries=3, seed=SEED), 60),
}


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("problem", list(PROBLEMS))
def test_lowers_held_out_loss(problem, opt_name):
    (x_train, y_train), (x_held, y_held), make_model = PROBLEMS[problem]()
    torch.manual_seed(3)
    model = make_model()
    factory, steps = OPTIMIZERS[opt_name]
    opt = factory(model.parameters())
    closure = make_closure(lambda: torch.nn.functional.mse_loss(model(x_train), y_train))

    def held_out():
        with torch.no_grad():
            return torch.nn.functional.mse_loss(model(x_held), y_held).item()

    before = held_out()
    for _ in range(steps):
        opt.step(closure)
    after = held_out()
    print(f"\nheld-out MSE {problem:13s} {opt_name:9s} {steps:4d} steps: {before:.4f} -> {after:.4f}")
    assert after < 0.5 * before
