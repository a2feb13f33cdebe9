"""Lorenza, Lorenza+ and GaLoreAdamW lower the held-out loss of a small regression whose matrices
are bigger than the rank, at the same rank and the same number of steps.

Teacher ``y = tanh(x A) B + noise`` (A 24 x 4, B 4 x 16), 256 train / 128 held-out rows; student
24-32-16 tanh MLP (weights 32 x 24 and 16 x 32, rank 4, refresh every 25 steps). Run with ``-s``
to see the held-out losses (LORENZA vs GaLoreAdamW).
"""

from __future__ import annotations

import pytest
import torch
from _optim_common import SEED, single_thread  # noqa: F401

from lorenza.optim import GaLoreAdamW, Lorenza, LorenzaPlus, make_closure

pytestmark = pytest.mark.usefixtures("single_thread")

STEPS, LR, RANK, INTERVAL = 100, 0.03, 4, 25
SVD = "randomized"  # Lorenza's default; GaLoreAdamW's is "exact"
OPTIMIZERS = {
    "LORENZA": lambda ps: Lorenza(ps, lr=LR, rank=RANK, update_interval=INTERVAL, svd=SVD, seed=SEED),
    "LorenzaPlus": lambda ps: LorenzaPlus(ps, lr=LR, rank=RANK, update_interval=INTERVAL, svd=SVD, seed=SEED),
    "GaLoreAdamW": lambda ps: GaLoreAdamW(ps, lr=LR, rank=RANK, update_interval=INTERVAL),
}


def _problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(384, 24, generator=g)
    a = torch.randn(24, 4, generator=g) * (2 / 24**0.5)
    b = torch.randn(4, 16, generator=g)
    y = torch.tanh(x @ a) @ b + 0.1 * torch.randn(384, 16, generator=g)
    return (x[:256], y[:256]), (x[256:], y[256:])


def test_lowers_held_out_loss():
    (x_train, y_train), (x_held, y_held) = _problem()
    results = {}
    for name, factory in OPTIMIZERS.items():
        torch.manual_seed(3)
        model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Tanh(), torch.nn.Linear(32, 16))
        opt = factory(model.parameters())
        closure = make_closure(lambda model=model: torch.nn.functional.mse_loss(model(x_train), y_train))

        def held_out(model=model):
            with torch.no_grad():
                return torch.nn.functional.mse_loss(model(x_held), y_held).item()

        before = held_out()
        for _ in range(STEPS):
            opt.step(closure)
        results[name] = (before, held_out())
        assert "proj" in opt.state[model[0].weight] and "proj" in opt.state[model[2].weight]  # both projected
        svd = opt._global["svd"]
        after = results[name][1]
        print(f"\nheld-out MSE {name:12s} rank {RANK} {STEPS} steps (svd={svd}): {before:.4f} -> {after:.4f}")
    print(
        f"\nLORENZA vs GaLoreAdamW held-out MSE: {results['LORENZA'][1]:.4f} vs {results['GaLoreAdamW'][1]:.4f} "
        f"(LorenzaPlus {results['LorenzaPlus'][1]:.4f})"
    )
    for name, (before, after) in results.items():
        assert after < 0.5 * before, name
