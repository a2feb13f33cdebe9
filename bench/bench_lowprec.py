"""Zeroth-order steps in bfloat16 and float16: exact probes against in-place probes.

Three parts, in one run:

  drift         a 256 x 256 tensor of N(0, 0.02^2) weights, MeZO with lr 0 (mu 1e-3): the relative
                drift ||theta_t - theta_0|| / ||theta_0|| after 10 / 100 / 1,000 / 5,000 steps,
                in place and exact, in bfloat16, float16 and float32 (exact: 0 by construction)
  fine-tune     the demo's model (lorenza.demo, its CPU default: 64-token sequences), pre-trained in
                float32 then fine-tuned in float32 and in bfloat16 with MeZO, MeZO-Adam, LOREN and
                AdaZo-SAM, same seeds, steps and minibatches: held-out loss before and after, the
                improvement, and (bfloat16) the improvement as a fraction of the float32 run's, for
                the default path (exact probes, stochastic rounding), exact probes rounding to
                nearest, and the old path (in-place probes, rounding to nearest)
  step          time and peak memory of one MeZO step, in place and exact, float32 and bfloat16:
                peak memory over the parameters' bytes (the largest parameter's copy is the
                expected overhead of an exact probe) and the time ratio exact / in place

  python bench/bench_lowprec.py [--quick] [--device cpu|cuda] [--json out.json] [--part drift,finetune,step]
"""

from __future__ import annotations

import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common

try:
    import lorenza.demo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python_api"))

from lorenza.demo import optimizers
from lorenza.demo.data import Batches, byte_tokens, load_corpus
from lorenza.demo.memory import PeakMemory, module_bytes
from lorenza.demo.model import LlamaLM, lm_loss, parse_size
from lorenza.demo.train import cached_pretrain, evaluate, finetune
from lorenza.optim import MeZO, make_closure

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PROBES = ("inplace", "exact")


def drift_rows(report: common.Report, device: str, quick: bool) -> None:
    checkpoints = (10, 100, 1000) if quick else (10, 100, 1000, 5000)
    for name, dtype in DTYPES.items():
        for probe in PROBES:
            g = torch.Generator().manual_seed(0)
            w = torch.nn.Parameter((torch.randn(256, 256, generator=g) * 0.02).to(device=device, dtype=dtype))
            w0 = w.detach().double().clone()
            opt = MeZO([w], lr=0.0, mu=1e-3, seed=1, probe=probe)
            closure = make_closure(lambda w=w: (w.float() ** 2).mean())
            done, t0 = 0, time.perf_counter()
            drift = {}
            for c in checkpoints:
                for _ in range(c - done):
                    opt.step(closure)
                done = c
                drift[f"drift@{c}"] = ((w.detach().double() - w0).norm() / w0.norm()).item()
            s = (time.perf_counter() - t0) * 1e3 / done
            report.add(f"drift {name}", probe, (s, s, s), **drift)


def _setup(device: str, quick: bool):
    corpus = load_corpus()
    cfg = parse_size("tiny" if quick else "small")
    seq = cfg.max_seq_len if quick else 64  # the demo's CPU default, so its pre-training cache serves
    batch = 4 if quick else 8
    pre = Batches(byte_tokens(corpus.text["pretrain"]), seq, batch, 1)
    cache = os.environ.get("LORENZA_DEMO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorenza-demo")
    model, _ = cached_pretrain(cfg, pre, 150 if quick else 500, 3e-3, torch.device(device), corpus.fingerprint, cache,
                               lambda *a: _NoProgress())  # fmt: skip
    train = Batches(byte_tokens(corpus.text["train"]), seq, batch, 0)
    heldout = Batches(byte_tokens(corpus.text["heldout"]), seq, batch, 0).heldout(2 if quick else 4, device)
    return model.cpu(), train, heldout


class _NoProgress:
    def update(self, *args) -> None:
        pass

    def close(self) -> None:
        pass


def finetune_rows(report: common.Report, device: str, quick: bool) -> None:
    base, train, heldout = _setup(device, quick)
    steps = 30 if quick else 150
    names = ["MeZO", "MeZOAdam", "Loren", "AdaZoSAM"]
    dev = torch.device(device)
    fp32_gain: dict[str, float] = {}
    # (label, probe, stochastic rounding): float32 has one path (rounding does not apply to it)
    paths = {
        "fp32": [("exact", "exact", True)],
        "bf16": [("exact+SR (default)", "exact", True), ("exact, nearest", "exact", False),
                 ("inplace, nearest (old)", "inplace", False)],
    }  # fmt: skip
    for dname in ("fp32", "bf16"):
        model = base.to(DTYPES[dname])
        initial = evaluate(model.to(dev), heldout)
        model.cpu()
        for name in names:
            for label, probe, sr in paths[dname]:
                hp = optimizers.Hyper(steps=steps, seed=0, options={"probe": probe, "stochastic_rounding": sr})
                t0 = time.perf_counter()
                res = finetune(name, model, train, heldout, steps, hp, dev, initial, steps, None)
                ms = (time.perf_counter() - t0) * 1e3 / steps
                gain = initial - res.heldout_loss
                if dname == "fp32":
                    fp32_gain[name] = gain
                ref = fp32_gain.get(name)
                report.add(
                    f"fine-tune {dname} {steps} steps", f"{name} {label}", (ms, ms, ms), start=initial,
                    end=res.heldout_loss, gain=gain, of_fp32=gain / ref if ref else None, error=res.error,
                )  # fmt: skip


def step_rows(report: common.Report, device: str, quick: bool) -> None:
    cfg = parse_size("tiny" if quick else "small")
    dev = torch.device(device)
    tokens = torch.randint(0, cfg.vocab_size, (8, cfg.max_seq_len + 1), device=dev)
    base: dict[str, float] = {}
    for dname in ("fp32", "bf16"):
        for probe in PROBES:
            torch.manual_seed(0)
            model = LlamaLM(cfg).to(device=dev, dtype=DTYPES[dname])
            opt = MeZO(model.parameters(), lr=1e-6, seed=0, probe=probe)
            closure = make_closure(lambda model=model: lm_loss(model, tokens))
            opt.step(closure)
            with PeakMemory(dev) as pm:
                pm.materialize(model)
                opt.step(closure)
            params = module_bytes(model)
            largest = max(p.numel() * p.element_size() for p in model.parameters())
            t = common.measure(lambda: opt.step(closure), dev, warmup=1, rep=5 if quick else 15)
            if probe == "inplace":
                base[dname] = t[0]
            report.add(
                f"MeZO step {dname}", probe, t, params_MB=params / 2**20, peak_MB=pm.peak_bytes / 2**20,
                largest_param_MB=largest / 2**20, peak_over_params=pm.peak_bytes / params,
                x_inplace=t[0] / base[dname] if dname in base else None,
            )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--part", default="drift,finetune,step", help="comma list of: drift, finetune, step")
    args = p.parse_args(argv)
    parts = {x.strip() for x in args.part.split(",")}
    report = common.Report("lowprec", args.device)
    if "drift" in parts:
        drift_rows(report, args.device, args.quick)
    if "step" in parts:
        step_rows(report, args.device, args.quick)
    if "finetune" in parts:
        finetune_rows(report, args.device, args.quick)
    report.finish(args.json)


if __name__ == "__main__":
    main()
