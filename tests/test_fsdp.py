"""FSDP2 (``fully_shard``) on CPU/gloo: every rank works on its shard with the noise of the shard's
global indices, and the run equals one process on the unsharded model (same seed) to rounding.

A tiny transformer sharded per block and at the root, over 2 and 3 ranks: uneven row shards
(7 rows over 2 or 3 ranks, 10 over 3) and an empty one (a 2-element vector over 3 ranks). Each
rank gets its share of the batch, as in data-parallel training; one process takes the whole batch
(the mean of equal shares is the whole-batch mean, to float32 rounding). With the same batch on
every rank, MeZO and MeZO-Adam are bitwise one process's. The low-rank optimizers and per-layer
mode are refused at construction, naming the parameter or option (docs/algorithms.md,
"Distributed training").
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from _optim_common import run_on_gloo_ranks, single_thread  # noqa: F401
from torch.distributed.tensor import Shard

from lorenza.optim import SAM, AdaZoSAM, GaLoreAdamW, Loren, Lorenza, LorenzaPlus, MeZO, MeZOAdam, make_closure
from lorenza.optim._sharding import col_range, shard_of

pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="gloo backend not available"),
]

STEPS, SEED = 3, 5


class Block(torch.nn.Module):
    def __init__(self, d: int, ff: int):
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, ff), torch.nn.Linear(ff, d)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, -1)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1)
        x = x + self.proj(att @ v)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class Tiny(torch.nn.Module):
    """Embedding (7 rows), two blocks, head (7 rows), and a 2-element ``mix`` (empty on rank 3 of 3)."""

    def __init__(self, vocab: int = 7, d: int = 6, ff: int = 10):
        super().__init__()
        torch.manual_seed(3)
        self.emb = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList(Block(d, ff) for _ in range(2))
        self.head = torch.nn.Linear(d, vocab)
        self.mix = torch.nn.Parameter(torch.tensor([1.0, 0.1]))

    def forward(self, ids):
        x = self.emb(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(x) * self.mix[0] + self.mix[1]


def data(n: int = 12, t: int = 5, vocab: int = 7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    return ids, torch.roll(ids, -1, 1)


#: LORENZA's settings: rank 2 < min(m, n) for every matrix (fc2, 6 x 10, is projected on the left,
#: the others on the right), a refresh at steps 1 and 3.
LOW = dict(lr=1e-2, mu=1e-2, rho=0.1, rank=2, update_interval=2, eps=1e-3, seed=SEED)


def _mezo(ps, probe):
    return MeZO(ps, lr=1e-2, mu=1e-2, num_probes=2, seed=SEED, probe=probe)


CASES = {
    "mezo": _mezo,
    "mezo_adam": lambda ps, probe: MeZOAdam(ps, lr=1e-2, mu=1e-2, seed=SEED, probe=probe),
    "loren": lambda ps, probe: Loren(ps, lr=1e-2, mu=1e-2, num_queries=3, lr_cov=1.0, seed=SEED, probe=probe),
    # Adam's first steps are nearly lr sign(g): eps keeps gradient rounding from being amplified
    "adazo_sam": lambda ps, probe: AdaZoSAM(
        ps, lr=1e-2, mu=1e-2, num_probes=2, rho=0.1, eps=1e-3, seed=SEED, probe=probe
    ),  # fmt: skip
    "adazo_sam_momentum": lambda ps, probe: AdaZoSAM(
        ps, lr=1e-2, mu=1e-2, rho=0.1, eps=1e-3, seed=SEED, probe=probe, probe_space="momentum"
    ),  # fmt: skip
    "sam": lambda ps, probe: SAM(ps, torch.optim.AdamW, rho=0.05, lr=1e-2, eps=1e-3),
    "adamw": lambda ps, probe: torch.optim.AdamW(ps, lr=1e-2, eps=1e-3),
    # LORENZA's default probes (singular), its subspace probes; Lorenza+ adds the residual
    "lorenza": lambda ps, probe: Lorenza(ps, probe=probe, **LOW),
    "lorenza_subspace": lambda ps, probe: Lorenza(ps, probe=probe, probe_space="subspace", **LOW),
    "lorenza_plus": lambda ps, probe: LorenzaPlus(ps, probe=probe, **LOW),
    "galore": lambda ps, probe: GaLoreAdamW(
        ps, lr=1e-2, rank=2, update_interval=2, svd="randomized", eps=1e-3, weight_decay=0.1, seed=SEED
    ),  # fmt: skip
}
RUNS = [
    (n, p)
    for n in ("mezo", "mezo_adam", "loren", "adazo_sam", "adazo_sam_momentum")
    + ("lorenza", "lorenza_subspace", "lorenza_plus")
    for p in ("exact", "inplace")
]
RUNS += [("sam", "-"), ("adamw", "-"), ("galore", "-")]
ZEROTH_ORDER = {"mezo", "mezo_adam", "loren"}


def _shard(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _steps(model, opt, name: str, ids, tgt, steps: int) -> list[float]:
    def loss_fn():
        out = model(ids)
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), tgt.reshape(-1))

    def torch_closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    closure = torch_closure if name == "adamw" else make_closure(loss_fn)
    return [float(opt.step(closure).detach()) for _ in range(steps)]


def _build(name: str, probe: str, sharded: bool):
    model = Tiny()
    if sharded:
        _shard(model)
    return model, CASES[name](list(model.parameters()), probe)


def train(name: str, probe: str, ids, tgt, sharded: bool, steps: int = STEPS):
    model, opt = _build(name, probe, sharded)
    losses = _steps(model, opt, name, ids, tgt, steps)
    return [_full(p) for p in model.parameters()], losses, opt


def _refusals() -> dict[str, str]:
    out = {}
    for name, cls in (("Lorenza", Lorenza), ("LorenzaPlus", LorenzaPlus), ("GaLoreAdamW", GaLoreAdamW)):
        try:  # svd="exact": GaLore-AdamW's default
            cls(list(_shard(Tiny()).parameters()), lr=1e-3, rank=2, svd="exact")
            out[name] = "no error"
        except TypeError as e:
            out[name] = str(e)
    try:
        AdaZoSAM(list(_shard(Tiny()).parameters()), lr=1e-3, per_layer=True)
        out["per_layer"] = "no error"
    except (TypeError, ValueError) as e:
        out["per_layer"] = str(e)
    return out


def _rank_run(rank: int, world: int) -> dict:
    ids, tgt = data()
    mine = ids.chunk(world)[rank], tgt.chunk(world)[rank]
    out = {}
    for name, probe in RUNS:
        params, losses, opt = train(name, probe, *mine, sharded=True)
        out[(name, probe)] = (params, losses)
    for name in ("mezo", "mezo_adam"):  # the whole batch on every rank
        out[(name, "same")] = train(name, "exact", ids, tgt, sharded=True)[0]
    params, _, opt = train("mezo_adam", "exact", *mine, sharded=True, steps=1)
    st = next(iter(opt.state.values()))
    out["state_types"] = [type(st["exp_avg"]).__name__, type(opt.param_groups[0]["params"][0]).__name__]
    # the r x n moments of a left-projected matrix (fc2, 6 x 10): this rank's columns only
    _, _, opt = train("galore", "-", *mine, sharded=True, steps=1)
    left = [st for p, st in opt.state.items() if "proj" in st and tuple(p.shape) == (6, 10)]
    out["left_moments"] = [(tuple(st[k].to_local().shape), st[k].placements) for st in left for k in MOMENTS]
    out["refusals"] = _refusals()
    return out


MOMENTS = ("exp_avg", "exp_avg_sq")


@pytest.mark.parametrize("world", [2, 3])
def test_fsdp2_ranks_equal_one_process(world, tmp_path):
    ranks = run_on_gloo_ranks(_rank_run, world, tmp_path)
    ids, tgt = data()
    start = [p.detach() for p in Tiny().parameters()]
    for name, probe in RUNS:
        single, single_losses, _ = train(name, probe, ids, tgt, sharded=False)
        for r in ranks:
            params, losses = r[(name, probe)]
            for a, b in zip(params, single):
                # float32 rounding: a mean of shares is not bitwise the whole-batch mean (and sums
                # of shards' norms or column sums are added in another order)
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name}/{probe}")
            if name in ZEROTH_ORDER:  # the rank-averaged probe losses
                assert losses == pytest.approx(single_losses, rel=1e-6, abs=1e-6), (name, probe)
        assert any((a - b).abs().max() > 1e-3 for a, b in zip(single, start)), name
    for name in ("mezo", "mezo_adam"):
        single = train(name, "exact", ids, tgt, sharded=False)[0]
        for r in ranks:
            for a, b in zip(r[(name, "same")], single):
                assert torch.equal(a, b), (name, (a - b).abs().max())
    for rank, r in enumerate(ranks):
        c0, c1 = col_range(10, world, rank)
        assert len(r["left_moments"]) == 2 * len(MOMENTS)  # fc2 of both blocks
        for shape, placements in r["left_moments"]:
            assert shape == (2, c1 - c0) and placements == (Shard(1),), (rank, shape, placements)
    for r in ranks:
        assert r["state_types"] == ["DTensor", "DTensor"]  # state laid out like the parameter
        for name, msg in r["refusals"].items():
            if name == "per_layer":
                assert msg.startswith("per_layer:") and "use per_layer=False" in msg, msg
            else:
                assert msg.startswith("params[0]: a DTensor (FSDP2's fully_shard) is not supported by " + name), msg
                assert "svd='exact'" in msg and "use svd='randomized'" in msg, msg


# --- checkpoints across world sizes ---------------------------------------------------------------

RESUMED = ["mezo", "mezo_adam", "loren", "adazo_sam", "adazo_sam_momentum", "galore", "lorenza", "lorenza_subspace"]


def _resume_run(rank: int, world: int) -> dict:
    """Per optimizer: 2 sharded steps, ``full_state_dict`` and the whole parameters, 2 more sharded
    steps; and one process's state after 2 steps loaded into a fresh sharded run, 2 more steps."""
    ids, tgt = data()
    mine = ids.chunk(world)[rank], tgt.chunk(world)[rank]
    out = {}
    for name in RESUMED:
        model, opt = _build(name, "exact", sharded=True)
        _steps(model, opt, name, *mine, 2)
        saved = opt.full_state_dict(), {k: _full(v) for k, v in model.state_dict().items()}
        _steps(model, opt, name, *mine, 2)
        continued = [_full(p) for p in model.parameters()]
        one, one_opt = _build(name, "exact", sharded=False)  # one process, whole batch, 2 steps
        _steps(one, one_opt, name, ids, tgt, 2)
        model, opt = _build(name, "exact", sharded=True)
        with torch.no_grad():
            for p, q in zip(model.parameters(), one.parameters()):
                shard = shard_of(p)  # this rank's rows of q
                shard.local.copy_(q[shard.row0 : shard.row0 + shard.local.shape[0]])
        opt.load_state_dict(one_opt.state_dict())
        kinds = sorted({type(v).__name__ for st in opt.state.values() for v in st.values()})
        _steps(model, opt, name, *mine, 2)
        out[name] = saved, continued, [_full(p) for p in model.parameters()], kinds
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_full_state_dict_resumes_on_another_world_size(world, tmp_path):
    """A sharded run's ``full_state_dict`` resumed in one process continues as the sharded run does;
    one process's ``state_dict`` loaded by ``world`` ranks continues as one process does."""
    ranks = run_on_gloo_ranks(_resume_run, world, tmp_path)
    ids, tgt = data()
    for name in RESUMED:
        (sd, msd), continued, from_one, kinds = ranks[0][name]
        model, opt = _build(name, "exact", sharded=False)
        model.load_state_dict(msd)
        opt.load_state_dict(sd)
        _steps(model, opt, name, ids, tgt, 2)
        for a, b in zip(model.parameters(), continued):
            torch.testing.assert_close(a.detach(), b, atol=1e-5, rtol=1e-5, msg=f"{name}: resumed on one rank")
        four = train(name, "exact", ids, tgt, sharded=False, steps=4)[0]
        for r in ranks:
            for a, b in zip(r[name][2], four):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"{name}: resumed on {world} ranks")
        if name != "mezo":  # state cut into DTensors like the parameters (plus whole vectors, scalars)
            assert "DTensor" in kinds, (name, kinds)


# --- the example ------------------------------------------------------------------------------------


def test_torchrun_example_saves_on_two_ranks_and_resumes_on_one(tmp_path):
    """examples/fsdp_torchrun.py: 4 steps on 2 ranks, saved, 2 more in one process == 6 in one process."""
    import os
    import subprocess
    import sys

    from _optim_common import _free_port

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = os.path.join(root, "examples", "fsdp_torchrun.py")
    ckpt = str(tmp_path / "ckpt.pt")
    path = os.pathsep.join([os.path.join(root, "python_api"), root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # this checkout's lorenza
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    done = subprocess.run(
        [*cmd, script, "--optimizer", "MeZOAdam", "--steps", "4", "--save", ckpt],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "saved" in done.stdout
    sys.path.insert(0, os.path.join(root, "examples"))
    try:
        import fsdp_torchrun
    finally:
        sys.path.pop(0)
    resumed = fsdp_torchrun.main(["--optimizer", "MeZOAdam", "--steps", "2", "--resume", ckpt])
    straight = fsdp_torchrun.main(["--optimizer", "MeZOAdam", "--steps", "6"])
    assert resumed == pytest.approx(straight, rel=1e-5)
