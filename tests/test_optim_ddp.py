"""torch.distributed: two CPU processes on gloo take identical steps, equal to one process on the
whole batch (the zeroth-order losses are averaged over the ranks; gradients by DDP)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _optim_common import MLP, SEED, mlp_closure, mlp_data, run_on_gloo_ranks, single_thread  # noqa: F401

from lorenza.optim import AdaZoSAM, Loren, MeZO, MeZOAdam

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="gloo backend not available"),
]

WORLD, STEPS = 2, 3
CASES = {
    "mezo": lambda ps: MeZO(ps, lr=2e-2, mu=1e-2, num_probes=2, seed=SEED),
    "mezo_adam": lambda ps: MeZOAdam(ps, lr=2e-2, mu=1e-2, seed=SEED),
    "loren": lambda ps: Loren(ps, lr=2e-2, mu=1e-2, num_queries=3, lr_cov=1.0, seed=SEED),
    "adazo_sam": lambda ps: AdaZoSAM(ps, lr=2e-2, mu=1e-2, num_probes=2, rho=0.1, seed=SEED),
}


def _train(name, x, y, ddp=False):
    model = MLP(seed=11)
    model.unused.requires_grad_(False)  # frozen: skipped by the optimizer, ignored by DDP
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp and name == "adazo_sam" else model
    opt = CASES[name](model.groups())
    losses = [float(opt.step(mlp_closure(net, x, y))) for _ in range(STEPS)]
    return [p.detach().clone() for p in model.parameters()], losses


def _rank_run(rank, world):
    x, y = mlp_data(n=32)
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]  # equal halves
    return {name: _train(name, xs, ys, ddp=True) for name in CASES}


def test_two_gloo_ranks_match_each_other_and_one_process(tmp_path):
    ranks = run_on_gloo_ranks(_rank_run, WORLD, tmp_path)
    x, y = mlp_data(n=32)
    for name in CASES:
        (p0, l0), (p1, l1) = ranks[0][name], ranks[1][name]
        for a, b in zip(p0, p1):
            assert torch.equal(a, b), name  # every rank takes the same step
        if name != "adazo_sam":  # the zeroth-order losses (returned by step) are the rank average
            assert l0 == l1
        single, _ = _train(name, x, y)  # one process, whole batch: mean of halves == full-batch mean
        for a, b in zip(p0, single):
            # Equal to rounding: a float32 mean of halves is not bitwise the full-batch mean, and the
            # zeroth-order step amplifies that rounding by lr / mu.
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
        assert any(not torch.equal(a, b) for a, b in zip(p0, MLP(seed=11).parameters()))
