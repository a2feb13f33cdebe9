"""Helpers shared by the tests of lorenza.optim: problems, noise regeneration, model copies."""

from __future__ import annotations

import copy

import pytest
import torch

import lorenza_kernels as lk
from lorenza.optim import probe_seed

SEED = 20250501


def noise(shape, seed: int, step: int, probe: int, stream: int, dtype=torch.float64) -> torch.Tensor:
    """The optimizers' z for (seed, step, probe) and a parameter's stream, materialised."""
    return lk.gaussian(tuple(shape), probe_seed(seed, step, probe), stream).to(dtype)


class Problem:
    """A smooth non-convex loss of a list of tensors of any shapes: per tensor
    ``mean((P - T)^2) + 0.1 mean(sin(3 P))``, plus a coupling term ``0.05 (sum_i <P_i, C_i>)^2``."""

    def __init__(self, shapes, gen_seed: int = 0):
        g = torch.Generator().manual_seed(gen_seed)
        self.shapes = [tuple(s) for s in shapes]
        self.init = [torch.randn(s, generator=g, dtype=torch.float64) * 0.5 for s in self.shapes]
        self.targets = [torch.randn(s, generator=g, dtype=torch.float64) for s in self.shapes]
        self.coupling = [torch.randn(s, generator=g, dtype=torch.float64) * 0.3 for s in self.shapes]

    def loss(self, params) -> torch.Tensor:
        total, inner = 0.0, 0.0
        for p, t, c in zip(params, self.targets, self.coupling):
            t, c = t.to(p.dtype), c.to(p.dtype)
            total = total + ((p - t) ** 2).mean() + 0.1 * torch.sin(3 * p).mean()
            inner = inner + (p * c).sum()
        return total + 0.05 * inner**2

    def params(self, dtype=torch.float32) -> list[torch.nn.Parameter]:
        return [torch.nn.Parameter(x.to(dtype).clone()) for x in self.init]

    def closure(self, params):
        from lorenza.optim import make_closure

        return make_closure(self.loss, params)


class MLP(torch.nn.Module):
    """Two layers and one parameter the forward pass never uses (frozen-by-accident case)."""

    def __init__(self, n_in=6, hidden=8, n_out=2, seed=0, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = torch.nn.Linear(n_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, n_out)
        self.unused = torch.nn.Parameter(torch.randn(3))
        self.to(dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))

    def groups(self, weight_decay=0.1):
        """Weights with decay, biases (and the unused vector) without."""
        decay = [p for n, p in self.named_parameters() if n.endswith("weight")]
        rest = [p for n, p in self.named_parameters() if not n.endswith("weight")]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def mlp_data(n=32, n_in=6, n_out=2, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    y = torch.stack([torch.sin(x[:, :3].sum(1)), torch.cos(x[:, 3:].sum(1))], 1)[:, :n_out]
    return x.to(dtype), y.to(dtype)


def mlp_closure(model, x, y, nan_at=None):
    """A closure on (x, y); ``nan_at``: a set of call numbers (from 0) that return NaN instead."""
    from lorenza.optim import make_closure

    calls = {"n": 0}

    def loss_fn():
        out = torch.nn.functional.mse_loss(model(x).float(), y.float())
        k = calls["n"]
        calls["n"] += 1
        if nan_at is not None and k in nan_at:
            out = out * float("nan")
        return out

    return make_closure(loss_fn)


def clone_model(model):
    return copy.deepcopy(model)


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y), (x - y).abs().max()


@pytest.fixture
def single_thread():
    """Tiny tensors: intra-op threads only add contention (the suite shares a small machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _gloo_worker(rank: int, world: int, port: int, out_dir: str, run) -> None:
    import datetime
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        torch.save(run(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # no rank tears the group down while another still uses it (gloo aborts then)
    finally:
        dist.destroy_process_group()


def run_on_gloo_ranks(run, world: int, out_dir) -> list:
    """``run(rank, world)`` in ``world`` processes joined by a gloo group; their results, by rank.

    ``run`` must be a module-level function (it is pickled into the spawned processes)."""
    import os

    torch.multiprocessing.spawn(_gloo_worker, args=(world, _free_port(), str(out_dir), run), nprocs=world, join=True)
    return [torch.load(os.path.join(str(out_dir), f"rank{r}.pt"), weights_only=True) for r in range(world)]
