"""The main job (python -m lorenza.demo), its model and data, the trainer integrations, bench/run_all.py.

Every optimizer of the registry is built and runs; a failing one fails the demo (it is a bug, not a
result). Optional packages (transformers + accelerate, matplotlib) skip their parts cleanly.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lorenza.demo import data, optimizers
from lorenza.demo.memory import PeakMemory, module_bytes, optimizer_state_bytes
from lorenza.demo.model import LlamaLM, apply_rotary, lm_loss, parse_size, rotary_cos_sin
from lorenza.integrations.loop import PassCounter, StepClosure, closure_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO = "dim=32,layers=1,heads=2,seq=32"


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def fake_sources(tmp_path_factory) -> str:
    """60 top-level modules/packages of Python-like text: every split gets some."""
    root = tmp_path_factory.mktemp("fake_stdlib")
    for i in range(60):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}  # line {j}\n" for j in range(40))
        if i % 2:
            pkg = root / f"pkg{i:02d}"
            pkg.mkdir()
            for j in range(3):
                (pkg / f"mod{j}.py").write_text(body + f"# {pkg.name}.mod{j}\n")
        else:
            (root / f"single{i:02d}.py").write_text(body)
    (root / "test").mkdir()
    (root / "test" / "skipped.py").write_text("x = 1\n")
    return str(root)


# ---------------------------------------------------------------- model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_causal_masking_and_shapes(tie):
    cfg = parse_size(f"{MICRO},tie={int(tie)}")
    torch.manual_seed(0)
    model = LlamaLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_params()
    assert (model.lm_head.weight is model.embed_tokens.weight) == tie
    x = torch.randint(0, 256, (2, 20))
    y = x.clone()
    y[:, 12] = (y[:, 12] + 1) % 256
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 20, 256)
    torch.testing.assert_close(a[:, :12], b[:, :12], rtol=0, atol=0)  # the past never sees the future
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_rotary():
    cos, sin = rotary_cos_sin(7, 8, 10000.0, "cpu", torch.float32)
    assert cos.shape == sin.shape == (7, 8)
    q = torch.randn(2, 3, 7, 8)
    r = apply_rotary(q, cos, sin)
    assert r.shape == q.shape
    torch.testing.assert_close(r[:, :, 0], q[:, :, 0])  # position 0: no rotation
    pairs = lambda t: t[..., :4] ** 2 + t[..., 4:] ** 2
    torch.testing.assert_close(pairs(r), pairs(q))
    # Relative positions: <R_m q, R_n k> depends on m - n only.
    k = torch.randn(8)
    qv = torch.randn(8)
    dots = [(apply_rotary(qv, cos[m], sin[m]) @ apply_rotary(k, cos[m - 2], sin[m - 2])).item() for m in (2, 4, 6)]
    assert max(dots) - min(dots) < 1e-4


def test_parse_size():
    assert parse_size("tiny").dim == 64
    cfg = parse_size("small,seq=64")
    assert (cfg.dim, cfg.max_seq_len) == (128, 64)
    assert parse_size("dim=96,layers=2,heads=3").ffn_dim == 256
    with pytest.raises(ValueError):
        parse_size("huge")
    with pytest.raises(ValueError):
        parse_size("dim=30,heads=4")


# ---------------------------------------------------------------- data


def test_split_is_deterministic_and_by_package(fake_sources):
    a, b = data.load_corpus(fake_sources), data.load_corpus(fake_sources)
    assert a.text == b.text and a.fingerprint == b.fingerprint
    assert all(a.text[s] for s in ("pretrain", "train", "heldout"))
    names = {s: set(m) for s, m in a.modules.items()}
    assert not (names["pretrain"] & names["train"]) and not (names["train"] & names["heldout"])
    assert not any(n.startswith("test.") for ns in names.values() for n in ns)
    # A package is either wholly pre-training or wholly fine-tuning.
    tops = {s: {n.split(".")[0] for n in ns} for s, ns in names.items()}
    assert not (tops["pretrain"] & (tops["train"] | tops["heldout"]))
    # Pinned: a change to the hashing would silently change every cached model and result.
    assert [data.split_of(n) for n in ("json.decoder", "os", "lib2to3.pytree")] == ["pretrain", "pretrain", "train"]


def test_stdlib_corpus_loads():
    c = data.load_corpus(max_bytes={"pretrain": 1 << 16, "train": 1 << 15, "heldout": 1 << 14})
    assert os.path.isdir(c.root) and all(len(c.text[s]) > 1000 for s in c.text)


def test_batches_depend_on_step_only():
    tokens = torch.arange(1000) % 256
    b = data.Batches(tokens.to(torch.uint8), 16, 4, seed=3)
    first = b.train(5)
    b.train(0), b.train(9)
    assert torch.equal(first, b.train(5)) and first.shape == (4, 17) and first.dtype == torch.int64
    assert not torch.equal(first, b.train(6))
    held = b.heldout(2)
    assert len(held) == 2 and torch.equal(held[0], b.heldout(2)[0])


# ---------------------------------------------------------------- registry, closure, memory


def test_registry():
    assert optimizers.resolve("adamw,MEZO") == ["AdamW", "MeZO"]
    assert optimizers.resolve("all") == optimizers.NAMES and len(optimizers.NAMES) == 9
    with pytest.raises(ValueError):
        optimizers.resolve("Adam")
    model = LlamaLM(parse_size(MICRO))
    opt = optimizers.build("AdamW", model, optimizers.Hyper(lr={"AdamW": 0.5}))
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups[0]["lr"] == 0.5
    groups = optimizers.lowrank_groups(model, 4, {"update_interval": 5})
    low = {id(p) for p in groups[0]["params"]}
    assert groups[0]["rank"] == 4 and "rank" not in groups[1]
    assert id(model.embed_tokens.weight) not in low and all(p.dim() == 2 for p in groups[0]["params"])
    for name in optimizers.NAMES:
        assert isinstance(optimizers.build(name, model), optimizers.optimizer_class(name))


def test_registry_options_reach_only_the_constructors_that_take_them():
    # Hyper.options go to the optimizers that take them; SAM's **base_kwargs are its base
    # optimizer's (torch.optim.AdamW takes no "probe"), LorenzaPlus's **kw are Lorenza's.
    model = LlamaLM(parse_size(MICRO))
    hp = optimizers.Hyper(options={"probe": "inplace"})
    assert isinstance(optimizers.build("SAM", model, hp), optimizers.optimizer_class("SAM"))
    assert optimizers.build("LorenzaPlus", model, hp).probe == "inplace"
    assert optimizers.build("AdaZoSAM", model, hp).probe == "inplace"
    assert isinstance(optimizers.build("AdamW", model, hp), torch.optim.AdamW)


class _ZeroOrder(torch.optim.Optimizer):
    """A two-point zeroth-order SGD of the test's own: calls the closure twice under no_grad."""

    def __init__(self, params, lr=1e-2, mu=1e-3):
        super().__init__(params, {"lr": lr, "mu": mu})

    @torch.no_grad()
    def step(self, closure=None):
        ps = [p for g in self.param_groups for p in g["params"]]
        zs = [torch.randn_like(p) for p in ps]
        mu, lr = self.param_groups[0]["mu"], self.param_groups[0]["lr"]
        for p, z in zip(ps, zs):
            p.add_(z, alpha=mu)
        plus = closure()
        for p, z in zip(ps, zs):
            p.add_(z, alpha=-2 * mu)
        minus = closure()
        c = float(plus - minus) / (2 * mu)
        for p, z in zip(ps, zs):
            p.add_(z, alpha=mu - lr * c)
        return plus


def test_closure_step_counts_and_zeroes():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)
    counter = PassCounter()
    adam = torch.optim.AdamW(model.parameters(), lr=0.0)
    closure_step(adam, loss_fn, counter=counter)
    closure_step(adam, loss_fn, counter=counter)
    model.zero_grad()
    loss_fn().backward()
    g = model.weight.grad.clone()
    closure_step(adam, loss_fn)
    torch.testing.assert_close(model.weight.grad, g)  # zeroed between steps, not accumulated
    assert (counter.forward, counter.backward) == (2, 2)
    zo = PassCounter()
    w = model.weight.detach().clone()
    loss = closure_step(_ZeroOrder(model.parameters()), loss_fn, counter=zo)
    assert (zo.forward, zo.backward) == (2, 0) and loss.ndim == 0 and not torch.equal(w, model.weight)


def test_same_randomness():
    drop = torch.nn.Dropout(0.5)
    x = torch.ones(1000)
    c = StepClosure(lambda: drop(x).sum(), same_randomness=True)
    with torch.no_grad():
        assert c().item() == c().item()
        other = StepClosure(lambda: drop(x).sum(), same_randomness=True)
        assert other().item() != c().item()


def test_memory_accounting():
    model = LlamaLM(parse_size(MICRO))
    with PeakMemory("cpu") as pm:
        pm.materialize(model)
        opt = torch.optim.AdamW(model.parameters())
        closure_step(opt, lambda: lm_loss(model, torch.randint(0, 256, (2, 17))))
    params = module_bytes(model)
    assert optimizer_state_bytes(opt) >= 2 * params  # exp_avg and exp_avg_sq (+ step counters)
    assert pm.peak_bytes >= 4 * params  # params + grads + two moments, + activations


# ---------------------------------------------------------------- the main job


def test_demo_tiny_run(fake_sources, tmp_path, capsys):
    from lorenza.demo.__main__ import main

    names = ["AdamW", "MeZO", "AdaZoSAM"]
    argv = [
        "--optimizers",
        ",".join(names),
        "--steps",
        "3",
        "--model-size",
        MICRO,
        "--pretrain-steps",
        "4",
        "--batch-size",
        "4",
        "--eval-batches",
        "1",
        "--data-root",
        fake_sources,
        "--out",
        str(tmp_path / "out"),
        "--cache",
        str(tmp_path / "cache"),
        "--no-progress",
    ]
    payload = main(argv)
    out = capsys.readouterr().out
    assert "| optimizer" in out and "AdamW" in out
    with open(tmp_path / "out" / "results.json") as f:
        saved = json.load(f)
    rows = {r["optimizer"]: r for r in saved["rows"]}
    expected_passes = {"AdamW": (1, 1), "MeZO": (2, 0), "AdaZoSAM": (3, 1)}
    for name in names:
        r = rows[name]
        assert r["error"] is None, r["error"]
        assert r["steps"] == 3 and math.isfinite(r["heldout_loss"]) and r["peak_mb"] > 0
        assert (r["fwd_per_step"], r["bwd_per_step"]) == expected_passes[name]
        assert [s for s, _ in saved["curves"][name]] == [0, 1, 2, 3]
    assert rows["AdamW"]["state_mb"] > 0 and payload["pretraining"]["cached"] is False
    assert os.path.exists(tmp_path / "out" / "loss_curves.png") == has("matplotlib")
    # Second run: the pre-trained model comes from the cache, the fine-tune is reproduced exactly.
    again = main(argv[:1] + ["AdamW"] + argv[2:])
    assert again["pretraining"]["cached"] is True
    assert again["rows"][0]["heldout_loss"] == rows["AdamW"]["heldout_loss"]


def test_a_failing_optimizer_fails_the_demo(fake_sources, tmp_path, monkeypatch):
    # An exception inside an optimizer is a bug: the demo stops with it instead of reporting a row.
    from lorenza import optim
    from lorenza.demo.__main__ import main

    def broken(self, closure=None):
        raise RuntimeError("broken optimizer")

    monkeypatch.setattr(optim.MeZO, "step", broken)
    argv = ["--optimizers", "MeZO", "--steps", "2", "--model-size", MICRO, "--pretrain-steps", "2",
            "--batch-size", "2", "--eval-batches", "1", "--data-root", fake_sources, "--out", str(tmp_path / "out"),
            "--cache", str(tmp_path / "cache"), "--no-progress"]  # fmt: skip
    with pytest.raises(RuntimeError, match="broken optimizer"):
        main(argv)


def test_plain_loop_example():
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import plain_loop
    finally:
        sys.path.pop(0)
    assert plain_loop.main(["--steps", "3"]) < 6.0


# ---------------------------------------------------------------- Hugging Face Trainer


@pytest.mark.skipif(not (has("transformers") and has("accelerate")), reason="needs transformers and accelerate")
def test_hf_trainer_drives_closure_steps(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

    from lorenza.integrations import LorenzaTrainer

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    data_ = [{"input_ids": torch.randint(0, 64, (16,))} for _ in range(8)]
    for d in data_:
        d["labels"] = d["input_ids"].clone()
    makers = {
        "zeroth-order (test's own)": lambda m: _ZeroOrder(m.parameters()),
        "AdamW": lambda m: torch.optim.AdamW(m.parameters(), lr=1e-3),
    }
    makers["lorenza MeZO"] = lambda m: optimizers.build("MeZO", m)
    for label, make in makers.items():
        model = LlamaForCausalLM(cfg)
        before = [p.detach().clone() for p in model.parameters()]
        args = TrainingArguments(
            output_dir=str(tmp_path / "hf"),
            max_steps=2,
            per_device_train_batch_size=4,
            report_to="none",
            save_strategy="no",
            logging_steps=1,
            use_cpu=True,
            disable_tqdm=True,
            max_grad_norm=1.0,
        )
        trainer = LorenzaTrainer(model=model, args=args, train_dataset=data_, optimizers=(make(model), None))
        trainer.train()
        c = trainer.pass_counter
        assert c.forward >= 2 and (c.backward == 0 if label != "AdamW" else c.backward == 2), (label, c)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters())), label
        assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h), label


@pytest.mark.skipif(not (has("transformers") and has("tokenizers")), reason="needs transformers and tokenizers")
def test_demo_fine_tunes_a_local_hf_model(tmp_path):
    """--model PATH: a tiny random Llama and a byte-level BPE tokenizer saved locally, nothing downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from lorenza.demo.__main__ import main

    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(
        ["def f(x):\n    return x + 1\n" * 20], trainers.BpeTrainer(vocab_size=280, initial_alphabet=alphabet)
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    path = str(tmp_path / "tiny-llama")
    fast.save_pretrained(path)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    payload = main(
        [
            "--model",
            path,
            "--optimizers",
            "AdamW,MeZO",
            "--steps",
            "2",
            "--seq-len",
            "16",
            "--batch-size",
            "2",
            "--eval-batches",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    rows = {r["optimizer"]: r for r in payload["rows"]}
    assert rows["AdamW"]["error"] is None and rows["AdamW"]["heldout_loss"] < payload["pretrained_heldout_loss"]
    assert payload["pretraining"] == {"pretrained": path}


def test_hf_model_flag_errors_are_clear(tmp_path, monkeypatch):
    from lorenza.demo.__main__ import load_hf

    with pytest.raises(SystemExit, match="not a local directory"):
        load_hf(str(tmp_path / "missing"), torch.device("cpu"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(SystemExit, match="optional package transformers"):
        load_hf(str(tmp_path), torch.device("cpu"))


# ---------------------------------------------------------------- benchmarks


def test_run_all_on_fake_benches(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "bench_fake.py").write_text(
        textwrap.dedent("""
        import common
        p = common.parser("a fake benchmark")
        args = p.parse_args()
        r = common.Report("fake", args.device)
        r.add("case 1", "ours", (1.0, 0.9, 1.1), speedup=2.0, quick=args.quick)
        r.finish(args.json)
    """)
    )
    (bench / "bench_broken.py").write_text("import sys\nprint('boom')\nsys.exit(3)\n")
    (bench / "helper.py").write_text("raise SystemExit('not a benchmark: must not run')\n")
    spec = importlib.util.spec_from_file_location("run_all", os.path.join(ROOT, "bench", "run_all.py"))
    run_all = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_all)
    code = run_all.main(["--bench-dir", str(bench), "--device", "cpu", "--quick"])
    assert code == 1  # bench_broken failed; the rest was still written
    merged = json.loads((bench / "results" / "cpu.json").read_text())
    assert set(merged["benches"]) == {"fake", "broken"}
    assert merged["benches"]["fake"]["rows"][0]["metrics"] == {"speedup": 2.0, "quick": True}
    assert merged["benches"]["broken"]["returncode"] == 3 and "boom" in merged["benches"]["broken"]["output_tail"]
    md = (bench / "results" / "cpu.md").read_text()
    assert "## fake" in md and "| case 1" in md and "**failed**: exit status 3" in md
    assert (
        run_all.main(
            ["--bench-dir", str(bench), "--device", "cpu", "--only", "fake", "--results-dir", str(tmp_path / "r")]
        )
        == 0
    )


def test_bench_ascent_alignment_runs(tmp_path):
    # The ascent is read where the closure runs its backward pass: SAM's is the gradient itself,
    # the zeroth-order ones have norm rho and a positive cosine (their sign comes from the probe).
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python_api")])}
    script = os.path.join(ROOT, "bench", "bench_ascent.py")
    cmd = [sys.executable, script, "--quick", "--part", "align", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    rows = data["rows"]
    cos = {key: v["mean"] for key, v in data["details"]["rows"].items()}
    assert cos["alignment MLP-77k / SAM"] == pytest.approx(1.0, abs=1e-5)
    assert cos["alignment LM tiny / SAM"] == pytest.approx(1.0, abs=1e-4)
    assert len(cos) == len(rows) == 17 and all(0.0 < c < 0.9 for key, c in cos.items() if not key.endswith("SAM"))
    for r in rows:
        norm = float(r["metrics"]["note"].split("‖eps‖ ")[1].split()[0])
        assert norm == pytest.approx(0.05, rel=0.2 if "q=8" in r["provider"] else 1e-3), r["provider"]


def test_bench_lowprec_drift_and_step_run(tmp_path):
    # lr 0: exact probes leave bf16/fp16/fp32 weights bitwise (drift exactly 0), in-place probes
    # drift in bf16 and fp16 and grow with the steps; the step rows carry the memory columns.
    out, md = tmp_path / "rows.json", tmp_path / "rows.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python_api")])}
    script = os.path.join(ROOT, "bench", "bench_lowprec.py")
    cmd = [
        sys.executable,
        script,
        "--quick",
        "--part",
        "drift,step",
        "--threads",
        "1",
        "--json",
        str(out),
        "--md",
        str(md),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {(r["case"], r["provider"]): r["metrics"] for r in json.loads(out.read_text())["rows"]}
    for dtype in ("fp32", "bf16", "fp16"):
        assert [rows[(f"drift {dtype}", "exact")][f"drift@{n}"] for n in (10, 100, 1000)] == [0.0, 0.0, 0.0]
    for dtype in ("bf16", "fp16"):
        inplace = [rows[(f"drift {dtype}", "inplace")][f"drift@{n}"] for n in (10, 100, 1000)]
        assert 0 < inplace[0] < inplace[1] < inplace[2], (dtype, inplace)
    for dtype in ("fp32", "bf16"):
        for probe in ("inplace", "exact"):
            m = rows[(f"MeZO step {dtype}", probe)]
            assert m["peak_MB"] >= m["forward_peak_MB"] > m["params_MB"] > 0
    assert "## lowprec" in md.read_text()


def test_bench_ascent_loren_part_runs(tmp_path):
    # Part "loren" at the quick sizes on the least squares (a few seconds): a row per optimizer; the
    # paper form's a does not move (its step is below float32's resolution), the normalized form's
    # moves by lr_cov per step, the oracle's stays at u; and --merge keeps an earlier run's rows.
    earlier = tmp_path / "earlier.json"
    old_row = {"bench": "ascent", "case": "ZO earlier", "provider": "MeZO", "median_ms": 1.0, "p20_ms": 1.0,
               "p80_ms": 1.0, "metrics": {"metric": "test loss"}}  # fmt: skip
    env = {"device": "cpu", "commit": "abc1234", "torch": "", "triton": "", "time": ""}
    details = {"seconds": 5.0, "rows": {"ZO earlier / MeZO": {"mean": 1.0}}}
    earlier.write_text(json.dumps({"bench": "ascent", "environment": env, "rows": [old_row], "details": details}))
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python_api")])}
    script = os.path.join(ROOT, "bench", "bench_ascent.py")
    cmd = [sys.executable, script, "--quick", "--part", "loren", "--problems", "ls", "--json", str(out),
           "--merge", str(earlier)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert data["rows"][0]["case"] == "ZO earlier" and "abc1234 (align,lm,mlp,zo)" in data["environment"]["commit"]
    rows = data["details"]["rows"]
    assert "ZO earlier / MeZO" in rows and data["details"]["seconds"] > 5.0
    forms = ["LOREN paper m=0.9", "LOREN normalized m=0.9", "LOREN oracle m=0.9"]
    forms += [f.replace("0.9", "0") for f in forms]
    case = "LOREN cov LS 8x8, condition 100, 200 forwards"
    assert {k.split(" / ")[1] for k in rows if k.startswith(case + " /")} == {"MeZO", "MeZOAdam", *forms}
    assert all(math.isfinite(rows[f"{case} / {f}"]["mean"]) for f in forms)
    a_case = "LOREN cov, a: LS 8x8, condition 100"
    notes = {r["provider"]: r["metrics"]["note"] for r in data["rows"] if r["case"] == a_case}
    for mom in ("0.9", "0"):
        assert rows[f"{a_case} / LOREN paper m={mom}"]["mean"] == 1.0
        assert rows[f"{a_case} / LOREN normalized m={mom}"]["mean"] > 1.0
        assert "mean relative step of a 1.00e-01" in notes[f"LOREN normalized m={mom}"]
        assert "|cos(a, u)|: 1.000, 1.000, 1.000, 1.000, 1.000" in notes[f"LOREN oracle m={mom}"]
    paired = {r["provider"] for r in data["rows"] if r["case"] == "LOREN cov, paired: LS 8x8, condition 100"}
    assert "LOREN normalized m=0.9 − LOREN paper m=0.9" in paired and "LOREN paper m=0 − MeZO" in paired


def test_bench_optimizer_step_runs(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "python_api")])}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "bench_optimizer_step.py"),
            "--device",
            "cpu",
            "--quick",
            "--sizes",
            "dim=32,layers=1,heads=2,seq=16",
            "--optimizers",
            "AdamW,MeZO",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    adamw = next(r for r in rows if r["provider"] == "AdamW")["metrics"]
    assert (adamw["fwd"], adamw["bwd"]) == (1, 1)
    assert adamw["state MB"] == pytest.approx(2 * adamw["params MB"], rel=0.01)


# ---------------------------------------------------------------- time, progress and the plot


def test_cpu_defaults_and_threads():
    from lorenza.demo.__main__ import parse_args

    a = parse_args(["--device", "cpu"])
    assert (a.model_size, a.seq_len, a.steps, a.pretrain_steps) == ("small", 64, 100, 500)
    assert parse_args(["--device", "cpu", "--seq-len", "128"]).seq_len == 128
    assert parse_args(["--device", "cpu", "--model-size", "tiny"]).seq_len is None  # the model's own
    with pytest.raises(SystemExit):
        parse_args(["--threads", "0"])


def test_calibration_and_weighted_progress(fake_sources):
    from lorenza.demo.report import Progress
    from lorenza.demo.train import calibrate

    corpus = data.load_corpus(fake_sources)
    cfg = parse_size(MICRO)
    train = data.Batches(data.byte_tokens(corpus.text["train"]), 16, 2, seed=0)
    model = LlamaLM(cfg)
    before = [p.detach().clone() for p in model.parameters()]
    per_step = calibrate(["AdamW", "MeZO", "Loren"], model, train, optimizers.Hyper(steps=10), torch.device("cpu"))
    assert set(per_step) == {"AdamW", "MeZO", "Loren"} and all(v > 0 for v in per_step.values())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # measured on copies
    # progress in seconds of work: half the work done -> 50%, the time left is the time spent so far
    p = Progress(10.0, "x", enabled=False)
    p._t0 -= 4.0
    p.update(5.0, "x", None)
    assert p.n / p.total == 0.5 and p.left() == pytest.approx(4.0, rel=0.05)
    assert math.isnan(Progress(1.0, enabled=False).left())


def test_every_curve_has_its_own_style():
    from lorenza.demo.report import line_styles, warmup_bump

    styles = line_styles(optimizers.NAMES)
    keys = {(s["color"], s["linestyle"], s["marker"]) for s in styles.values()}
    assert len(keys) == len(optimizers.NAMES)
    # the pairs whose curves coincide differ in line style AND marker, not only in colour
    for a, b in [("AdamW", "AdaZoSAM"), ("Lorenza", "LorenzaPlus"), ("MeZO", "MeZOAdam")]:
        assert styles[a]["linestyle"] != styles[b]["linestyle"] and styles[a]["marker"] != styles[b]["marker"]
    curves = {"AdamW": [(0, 1.8), (5, 1.95), (10, 1.7)], "MeZO": [(0, 1.8), (10, 1.79)]}
    assert warmup_bump(curves, 1.8, ["AdamW"]) == pytest.approx(0.15)
    assert warmup_bump(curves, 1.8, ["MeZO"]) == 0.0


@pytest.mark.skipif(not has("matplotlib"), reason="needs matplotlib")
def test_plot_has_a_zeroth_order_panel_on_its_own_scale(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorenza.demo import report

    captured = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, *a, **k):
        captured["fig"] = fig
        return real_savefig(fig, *a, **k)

    curves = {
        "AdamW": [(0, 1.8), (5, 1.9), (10, 1.7)],
        "MeZO": [(0, 1.8), (10, 1.799)],
        "Loren": [(0, 1.8), (10, 1.798)],
    }
    plt.Figure.savefig = keep
    try:
        path = report.plot_curves(str(tmp_path / "p.png"), curves, {"AdamW": 3, "MeZO": 2, "Loren": 10}, "t", 1.8,
                                  {"MeZO", "Loren"})  # fmt: skip
    finally:
        plt.Figure.savefig = real_savefig
    assert os.path.getsize(path) > 0
    axes = captured["fig"].axes
    assert len(axes) == 4
    zo = axes[3]
    assert {line.get_label() for line in zo.lines} >= {"MeZO", "Loren"}
    lo_, hi = zo.get_ylim()
    assert hi - lo_ < 0.01  # its own scale: the 0.002 improvements fill the panel
