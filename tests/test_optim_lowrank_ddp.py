"""torch.distributed: two CPU processes on gloo, models wrapped in DistributedDataParallel. The
ranks see the same averaged gradient, hence build the same bases and take identical steps, equal
to one process on the whole batch up to rounding."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _optim_common import SEED, run_on_gloo_ranks, single_thread  # noqa: F401

from lorenza.optim import GaLoreAdamW, Lorenza, make_closure

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="gloo backend not available"),
]

WORLD, STEPS = 2, 4
SVD = "randomized"  # Lorenza's default; GaLoreAdamW's is "exact"
CASES = {
    "lorenza": lambda ps: Lorenza(
        ps, lr=2e-2, mu=1e-2, rho=0.1, num_probes=2, rank=2, update_interval=2, svd=SVD, seed=SEED
    ),
    "galore": lambda ps: GaLoreAdamW(ps, lr=2e-2, rank=2, update_interval=2, svd=SVD, seed=SEED),
}


def _model():
    torch.manual_seed(11)
    nn = torch.nn
    return nn.Sequential(nn.Linear(10, 6), nn.Tanh(), nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 2))


def _data(n=32):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 10, generator=g)
    return x, torch.stack([torch.sin(x[:, :3].sum(1)), torch.cos(x[:, 3:].sum(1))], 1)


def _train(name, x, y, ddp=False):
    model = _model()
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = CASES[name](model.parameters())
    closure = make_closure(lambda: torch.nn.functional.mse_loss(net(x), y))
    for _ in range(STEPS):
        opt.step(closure)
    bases = [opt.state[p]["proj"].clone() for p in model.parameters() if "proj" in opt.state.get(p, {})]
    return [p.detach().clone() for p in model.parameters()], bases


def _rank_run(rank, world):
    x, y = _data()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    return {name: _train(name, xs, ys, ddp=True) for name in CASES}


def test_two_gloo_ranks_build_the_same_bases_and_steps(tmp_path):
    ranks = run_on_gloo_ranks(_rank_run, WORLD, tmp_path)
    x, y = _data()
    for name in CASES:
        (p0, q0), (p1, q1) = ranks[0][name], ranks[1][name]
        assert len(q0) == 2  # fc 6 x 10 and 9 x 6 are projected (rank 2), 2 x 9 is dense
        for a, b in zip(p0 + q0, p1 + q1):
            assert torch.equal(a, b), name  # bitwise across ranks
        single, single_bases = _train(name, x, y)
        for a, b in zip(p0 + q0, single + single_bases):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
        assert any(not torch.equal(a, b) for a, b in zip(p0, _model().parameters()))
