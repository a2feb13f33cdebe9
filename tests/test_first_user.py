"""What a first user hit (sparse gradients, per-layer mode under data parallelism, sharded
parameters, skipped steps in low precision, the Trainer's logged gradient norm, rough edges of the
API and the demo's command line): each case fails loudly and names the argument, or is correct."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import torch
from _optim_common import SEED, run_on_gloo_ranks, single_thread  # noqa: F401
from torch import nn

import lorenza.optim as lo
import lorenza_kernels as lk
from lorenza.optim import SAM, AdaZoSAM, GaLoreAdamW, Loren, Lorenza, LorenzaPlus, MeZO, MeZOAdam

pytestmark = pytest.mark.usefixtures("single_thread")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOW = dict(rank=2, update_interval=3)


def _factories(probe: str = "exact") -> dict:
    p = {"probe": probe}
    return {
        "MeZO": lambda ps: MeZO(ps, lr=1e-2, num_probes=2, seed=SEED, **p),
        "MeZOAdam": lambda ps: MeZOAdam(ps, lr=1e-2, seed=SEED, **p),
        "AdaZoSAM": lambda ps: AdaZoSAM(ps, lr=1e-2, seed=SEED, **p),
        "AdaZoSAM-per-layer": lambda ps: AdaZoSAM(ps, lr=1e-2, seed=SEED, per_layer=True, **p),
        "Lorenza": lambda ps: Lorenza(ps, lr=1e-2, seed=SEED, **LOW, **p),
        "LorenzaPlus": lambda ps: LorenzaPlus(ps, lr=1e-2, seed=SEED, **LOW, **p),
        "Loren": lambda ps: Loren(ps, lr=1e-2, num_queries=3, lr_cov=1.0, seed=SEED, **p),
        "GaLoreAdamW": lambda ps: GaLoreAdamW(ps, lr=1e-2, svd="randomized", seed=SEED, **LOW),
        "SAM": lambda ps: SAM(ps, torch.optim.AdamW, rho=0.05, lr=1e-2),
    }


FACTORIES = _factories()
GRADIENT_TAKERS = ["AdaZoSAM", "AdaZoSAM-per-layer", "Lorenza", "LorenzaPlus", "GaLoreAdamW", "SAM"]


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer):
    import copy

    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _within_inplace_bound(a: torch.Tensor, b: torch.Tensor, amplitude: float = 0.05) -> bool:
    """probe="inplace" removes a perturbation ``d`` by subtracting it again, regenerated: each element
    is back within the (at most three) roundings of docs/algorithms.md ("Skipped steps"), 2 eps (|p| + 2 |d|);
    ``|d|`` is below ``mu |z|`` (6e-3) for the probes and ``rho`` (0.05) for the SAM ascent."""
    eps = torch.finfo(b.dtype).eps
    a, b = a.detach().double(), b.detach().double()
    return bool(((a - b).abs() <= 2 * eps * (b.abs() + 2 * amplitude)).all())


def _assert_untouched(model, opt, snap, bitwise: bool = True) -> None:
    params, sd = snap
    for a, b in zip(model.parameters(), params):
        if bitwise:
            assert torch.equal(a.detach(), b), (a.detach().double() - b.double()).abs().max()
        else:
            assert _within_inplace_bound(a.detach(), b)
    now = opt.state_dict()
    assert now.get("lorenza") == sd.get("lorenza")
    assert set(now["state"]) == set(sd["state"])
    for k, st in sd["state"].items():
        for key, v in st.items():
            w = now["state"][k][key]
            assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v, key


# --- 1. sparse gradients ---------------------------------------------------------------------------


class SparseLM(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(12, 8, sparse=True)
        self.fc = nn.Linear(8, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(self.emb(x)))).squeeze(-1)


SPARSE_CASES = [
    (n, p) for n in GRADIENT_TAKERS for p in ("exact", "inplace") if p == "exact" or n not in ("GaLoreAdamW", "SAM")
]


@pytest.mark.parametrize("name, probe", SPARSE_CASES)
def test_sparse_gradient_is_a_clear_error_and_changes_nothing(name, probe):
    model = SparseLM()
    x, y = torch.randint(0, 12, (6,)), torch.randn(6)
    opt = _factories(probe)[name](lo.param_groups(model, ["fc", "out"], rank=2, update_interval=3)
                                  if name.startswith(("Lorenza", "GaLore")) else list(model.parameters()))  # fmt: skip
    closure = lo.make_closure(lambda: nn.functional.mse_loss(model(x), y))
    for _attempt in range(2):  # the second attempt starts from the state the first left behind
        snap = _snapshot(model, opt)
        with pytest.raises(TypeError, match=r"param_groups\[\d\]\['params'\]\[0\] of shape \(12, 8\): .*sparse"):
            opt.step(closure)
        if "per-layer" in name:
            # per-layer mode updates each layer in its hook: the layers whose hooks ran before the
            # embedding's keep their update (docs/algorithms.md, "Exceptions"); the embedding does not
            assert torch.equal(model.emb.weight.detach(), snap[0][0]) or probe == "inplace"
            assert _within_inplace_bound(model.emb.weight, snap[0][0])
        else:
            _assert_untouched(model, opt, snap, bitwise=probe == "exact")


def test_galore_sparse_gradient_without_closure_beyond_the_first_step():
    model = SparseLM()
    model.emb.sparse = False
    x, y = torch.randint(0, 12, (6,)), torch.randn(6)
    opt = GaLoreAdamW(lo.param_groups(model, ["fc"], rank=2, update_interval=2), lr=1e-2, seed=SEED)
    for _ in range(3):  # bases built, state exists
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    model.emb.sparse = True
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    snap = _snapshot(model, opt)
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    _assert_untouched(model, opt, snap)


def test_zeroth_order_optimizers_take_no_gradient_so_sparse_modules_work():
    model = SparseLM()
    x, y = torch.randint(0, 12, (6,)), torch.randn(6)
    opt = MeZO(model.parameters(), lr=1e-3, seed=SEED)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lo.make_closure(lambda: nn.functional.mse_loss(model(x), y)))
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


# --- 2, 3. data parallelism: per-layer mode refused, DTensors FSDP2 does not manage refused ------------------


def _distributed_checks(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    out = {}

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))

    for name in ("AdaZoSAM", "Lorenza", "GaLoreAdamW"):
        cls = {"AdaZoSAM": AdaZoSAM, "Lorenza": Lorenza, "GaLoreAdamW": GaLoreAdamW}[name]
        try:
            cls(model().parameters(), lr=1e-3, per_layer=True)
            out[f"per_layer/{name}"] = "no error"
        except ValueError as e:
            out[f"per_layer/{name}"] = str(e)
    # built before the group, or its process group set later: refused at the step
    m = model()
    opt = AdaZoSAM(m.parameters(), lr=1e-3)
    opt.per_layer = True
    try:
        opt.step(lo.make_closure(lambda: m(torch.ones(2, 4)).sum()))
        out["per_layer/step"] = "no error"
    except ValueError as e:
        out["per_layer/step"] = str(e)
    mesh = init_device_mesh("cpu", (world,))
    dt = nn.Parameter(distribute_tensor(torch.randn(8, 4), mesh, [Shard(0)]))
    sharded = model()
    fully_shard(sharded, mesh=mesh)
    for name, build in FACTORIES.items():
        if name == "SAM" or "per-layer" in name:  # SAM: tests/test_fsdp.py; per-layer: above
            continue
        for what, params in (("dtensor", [dt]), ("fully_shard", list(sharded.parameters()))):
            try:
                build(params)
                out[f"{what}/{name}"] = "no error"
            except TypeError as e:
                out[f"{what}/{name}"] = str(e)
    return out


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_data_parallel_misuse_is_refused(tmp_path):
    results = run_on_gloo_ranks(_distributed_checks, 2, tmp_path)
    for res in results:
        for key, msg in res.items():
            if key.startswith("per_layer"):
                assert msg.startswith("per_layer:") and "world size 2" in msg, (key, msg)
            elif key.startswith("fully_shard/"):  # FSDP2: tests/test_fsdp.py (GaLoreAdamW: svd="randomized" here)
                assert msg == "no error", (key, msg)
            else:  # a DTensor FSDP2 does not manage
                assert msg.startswith("params[0]: a DTensor that no FSDP2 module manages"), (key, msg)
                assert "not supported" in msg, (key, msg)


def test_docs_make_no_fsdp_claim():
    with open(os.path.join(ROOT, "python_api", "lorenza", "optim", "adazo_sam.py")) as f:
        src = f.read()
    assert "or FSDP" not in src


# --- 4. skipped steps leave low-precision parameters bitwise ----------------------------------------


def _small(dtype):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def _nan_closure(model, x, y, where: str):
    def closure():
        loss = nn.functional.mse_loss(model(x).float(), y)
        if where == "always" or torch.is_grad_enabled():
            loss = loss * float("nan")
        if torch.is_grad_enabled():
            loss.backward()
        return loss.detach()

    return closure


def _groups(name, model):
    return lo.param_groups(model, "all-linear", **LOW) if name.startswith(("Lorenza", "GaLore")) else model.parameters()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_200_skipped_steps_leave_parameters_bitwise(name, dtype):
    model = _small(dtype)
    x, y = torch.randn(5, 6, dtype=dtype), torch.randn(5, 3)
    opt = FACTORIES[name](_groups(name, model))
    for _ in range(3):  # real steps first: the state exists
        opt.step(lo.make_closure(lambda: nn.functional.mse_loss(model(x).float(), y)))
    before = [p.detach().clone() for p in model.parameters()]
    skipped = opt.skipped_steps  # torch's AdamW under SAM overflows in float16 (eps 1e-8 is 0 there)
    wheres = ["always", "backward"] if name in GRADIENT_TAKERS else ["always"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for k in range(200):
            opt.step(_nan_closure(model, x, y, wheres[k % len(wheres)]))
    assert opt.skipped_steps == skipped + 200
    for a, b in zip(model.parameters(), before):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["MeZO", "AdaZoSAM", "Lorenza", "Loren"])
def test_inplace_probe_skip_is_within_its_documented_bound(name, dtype):
    # probe="inplace": a skipped step subtracts the regenerated noise; each element is back within
    # the two roundings of docs/algorithms.md ("Skipped steps"): |p' - p| <= eps (|p| + |mu z|).
    model = _small(dtype)
    x, y = torch.randn(5, 6, dtype=dtype), torch.randn(5, 3)
    opt = _factories("inplace")[name](_groups(name, model))
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        opt.step(_nan_closure(model, x, y, "always"))
    for a, b in zip(model.parameters(), before):
        assert _within_inplace_bound(a.detach(), b)


# --- 5. the Trainer logs the gradient norm before clipping -----------------------------------------


@pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("accelerate") is None,
    reason="needs transformers and accelerate",
)
def test_trainer_logs_the_norm_before_clipping(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from lorenza.integrations import LorenzaTrainer

    def llama():
        torch.manual_seed(3)
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
        return LlamaForCausalLM(cfg)

    ids = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(4))
    data = [{"input_ids": ids, "labels": ids} for _ in range(8)]  # every batch the same: order irrelevant

    def run(make_opt):
        model = llama()
        args = TrainingArguments(
            output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to="none",
            save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=1e-3, logging_steps=1,
            lr_scheduler_type="constant",
        )  # fmt: skip
        trainer = LorenzaTrainer(model=model, args=args, train_dataset=data, optimizers=(make_opt(model), None))
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]

    # AdamW: the logged norm is the norm of the gradient at the initial weights, before clipping
    ref = llama()
    b = torch.stack([ids] * 4)
    ref(input_ids=b, labels=b).loss.backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    logs = run(lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3))
    assert len(logs) == 3 and logs[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert all(h["grad_norm"] > 1e-3 * 10 for h in logs)  # not the clipped value
    logs = run(lambda m: AdaZoSAM(m.parameters(), lr=1e-3, seed=1))
    assert all(h["grad_norm"] > 1e-3 * 10 for h in logs)
    logs = run(lambda m: MeZO(m.parameters(), lr=1e-4, seed=1))
    assert len(logs) == 3 and not any("grad_norm" in h for h in logs)  # no gradient, no norm


# --- 9, 10. rough edges -----------------------------------------------------------------------------


def test_gaussian_shape_and_seed_types():
    with pytest.raises(TypeError, match="shape"):
        lk.gaussian(4.0, seed=1)
    for seed in (np.int64(5), np.uint32(5), torch.tensor(5)):
        assert torch.equal(lk.gaussian(7, seed=seed), lk.gaussian(7, seed=5))
    assert MeZO([nn.Parameter(torch.zeros(3))], seed=np.int64(9)).seed == 9
    with pytest.raises(TypeError, match="seed"):
        lk.gaussian(3, seed=1.5)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--model-size", "huge"], "--model-size"),
        (["--model-size", "dim=abc"], "--model-size"),
        (["--lr", "Lorenza=abc"], "--lr"),
        (["--lr", "Lorenza"], "--lr"),
        (["--lr", "Nope=1e-3"], "--lr"),
        (["--lr", "MeZO=-1"], "--lr"),
        (["--optimizers", "Nope"], "--optimizers"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_demo_command_line_errors_name_the_flag(argv, flag, capsys):
    from lorenza.demo.__main__ import parse_args

    with pytest.raises(SystemExit) as info:
        parse_args(argv)
    assert info.value.code == 2
    assert f"error: {flag}" in capsys.readouterr().err


def test_default_learning_rates():
    ps = [nn.Parameter(torch.zeros(4, 4))]
    assert MeZO(ps).defaults["lr"] == 1e-6
    assert Loren(ps).defaults["lr"] == 1e-6
    assert MeZOAdam(ps).defaults["lr"] == 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the 4 x 4 matrix is below the default rank
        assert AdaZoSAM(ps).defaults["lr"] == Lorenza(ps).defaults["lr"] == GaLoreAdamW(ps).defaults["lr"] == 1e-3


@pytest.mark.parametrize("name", ["MeZO", "MeZOAdam", "Loren", "AdaZoSAM"])
def test_all_frozen_warns_once(name):
    model = _small(torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    opt = FACTORIES[name](list(model.parameters()))
    x = torch.randn(5, 6)
    closure = lo.make_closure(lambda: model(x).square().mean())
    if name == "AdaZoSAM":  # a gradient taker: with every parameter frozen its closure cannot backward
        closure = lambda: model(x).square().mean()  # noqa: E731
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(UserWarning, match="no parameter requires grad"):
        opt.step(closure)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


@pytest.mark.parametrize("cls", [Lorenza, GaLoreAdamW])
def test_dense_fallback_of_a_rank_group_warns_once_naming_the_parameters(cls):
    wide, narrow, vec = (
        nn.Parameter(torch.zeros(16, 12)),
        nn.Parameter(torch.zeros(16, 3)),
        nn.Parameter(torch.zeros(5)),
    )
    with pytest.warns(UserWarning) as record:
        cls([{"params": [wide, narrow, vec], "rank": 4}, {"params": [nn.Parameter(torch.zeros(2))], "rank": 4}])
    msgs = [str(w.message) for w in record if "dense" in str(w.message)]
    assert len(msgs) == 1
    assert "param_groups[0]['params'][1] of shape (16, 3) (rank 4 >= 3)" in msgs[0]
    assert "param_groups[0]['params'][2] of shape (5,)" in msgs[0]
    assert "(16, 12)" not in msgs[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cls([{"params": [wide], "rank": 4}, {"params": [narrow, vec], "rank": None}])


# --- 6. make demo does not rebuild an unchanged extension -------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_build_is_a_no_op_when_nothing_changed():
    stamps = [f for f in os.listdir(os.path.join(ROOT, ".venv")) if f.startswith(".built-")] if os.path.isdir(
        os.path.join(ROOT, ".venv")) else []  # fmt: skip
    if not stamps:
        pytest.skip("no make-built environment here (.venv/.built-*)")
    out = subprocess.run(["make", "-n", "-C", ROOT, "build"], capture_output=True, text=True, check=True).stdout
    assert "pip install" not in out, out


@pytest.mark.parametrize("cls", [Lorenza, GaLoreAdamW])
def test_galore_style_groups_a_group_without_rank_is_dense(cls):
    # galore-torch's convention: [{"params": matrices, "rank": r}, {"params": rest}] -> rest is dense,
    # silently (the default rank is not applied to the group that names none)
    big, other = nn.Parameter(torch.randn(16, 12)), nn.Parameter(torch.randn(16, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = cls([{"params": [big], "rank": 4}, {"params": [other]}], lr=1e-3)
    assert opt.param_groups[0]["rank"] == 4 and opt.param_groups[1]["rank"] is None
    assert cls([other], lr=1e-3, rank=4).param_groups[0]["rank"] == 4
