"""Every optimizer makes O(1) ``lorenza_kernels`` op calls per step: as many for 6 layers as for 2
(per-layer mode excepted, where the updates are per parameter by definition). Counted outside the
closure: exact probes perturb each parameter where the forward pass reads it, one call per read,
as part of the forward (``docs/algorithms.md``, "Exact probes")."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from lorenza.optim import AdaZoSAM, GaLoreAdamW, Loren, Lorenza, LorenzaPlus, MeZO, MeZOAdam, make_closure

NS = "lorenza_kernels::"

FACTORIES = {
    "MeZO": lambda g: MeZO(g, lr=1e-3),
    "MeZOAdam": lambda g: MeZOAdam(g, lr=1e-3),
    "AdaZoSAM": lambda g: AdaZoSAM(g, lr=1e-3, num_probes=2),
    "Lorenza": lambda g: Lorenza(g, lr=1e-3, rank=4, update_interval=2, num_probes=2),
    "LorenzaPlus": lambda g: LorenzaPlus(g, lr=1e-3, rank=4, update_interval=2, moment_transform="reset"),
    "GaLoreAdamW": lambda g: GaLoreAdamW(g, lr=1e-3, rank=4, update_interval=2, svd="randomized"),
    "Loren": lambda g: Loren(g, lr=1e-3, num_queries=3),
}


def _model(layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(12, 12), nn.Tanh()]
    return nn.Sequential(*blocks, nn.Linear(12, 1))


def optimizer_op_calls(events) -> tuple[int, int]:
    """``lorenza_kernels`` op events of a profiled step outside any ``closure`` range, and all of them."""

    def in_closure(e) -> bool:
        while e is not None:
            if e.name == "closure":
                return True
            e = e.cpu_parent
        return False

    ours = [e for e in events if e.name.startswith(NS)]
    return sum(1 for e in ours if not in_closure(e)), len(ours)


def _calls(name: str, layers: int, step: int) -> tuple[int, int]:
    """Optimizer-side op calls of step ``step`` (steps 1..step-1 run before, unprofiled)."""
    model = _model(layers)
    x, y = torch.randn(8, 12), torch.randn(8, 1)
    opt = FACTORIES[name](model.parameters())
    inner = make_closure(lambda: nn.functional.mse_loss(model(x), y))

    def closure():
        with record_function("closure"):
            return inner()

    for _ in range(step - 1):
        opt.step(closure)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        opt.step(closure)
    return optimizer_op_calls(prof.events())


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("step", [1, 2, 3], ids=["first", "refresh", "steady"])
def test_op_calls_do_not_grow_with_layers(name, step):
    # step 1 builds state (and bases), step 3 refreshes the bases of update_interval=2 optimizers.
    (few, total), (many, _) = _calls(name, 2, step), _calls(name, 6, step)
    assert few == many, f"{name} step {step}: {few} op calls with 2 layers, {many} with 6"
    assert total >= 1  # the step does use the kernels (inside its probes, for exact probes)
