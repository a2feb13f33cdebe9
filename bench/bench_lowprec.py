"""Zeroth-order steps in bfloat16 and float16: exact probes against in-place probes.

Four parts, in one run:

  drift         a 256 x 256 tensor of N(0, 0.02^2) weights, MeZO with lr 0 (mu 1e-3): the relative
                drift ||theta_t - theta_0|| / ||theta_0|| after 10 / 100 / 1,000 / 5,000 steps,
                in place and exact, in bfloat16, float16 and float32 (exact: 0 by construction)
  fine-tune     the demo's model (lorenza.demo, its CPU default: 64-token sequences), pre-trained in
                float32 then fine-tuned in float32 and in bfloat16 with MeZO, MeZO-Adam, LOREN and
                AdaZo-SAM, 500 steps, the same seeds (``FINETUNE_SEEDS``) and minibatches: the
                held-out improvement (start minus end; mean, standard error and each seed's) and,
                in bfloat16, its mean as a fraction of the float32 mean, for the default path
                (exact probes, stochastic rounding), exact probes rounding to nearest, and the old
                path (in-place probes, rounding to nearest)
  autocast      MeZO's fine-tune above with float32 weights and the forward in bfloat16
                (torch.autocast): the cost of the forward's precision alone
  step          time and peak memory of one MeZO step, in place and exact, float32 and bfloat16:
                peak memory over the parameters' bytes, the peak of a no-grad forward alone
                (inference: parameters and activations) and what the step adds to it (the
                largest parameter's copy is the expected overhead of an exact probe), and the
                time ratio exact / in place (the two paths' steps alternate)

  python bench/bench_lowprec.py [--quick] [--device cpu|cuda] [--json out.json] [--part drift,finetune,autocast,step]
      [--threads N] [--md out.md]
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

_T0 = time.perf_counter()
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


# seeds per optimizer: a MeZO run's held-out gain varies from seed to seed by more than the gain
# itself (500 steps: +0.0011 and +0.0027 in float32 for seeds 0 and 1), so the cheap two-forward
# optimizers run 5 seeds; LOREN (ten forwards a step) and AdaZo-SAM (a backward pass, a gain a
# hundred times larger) run fewer to keep the part under an hour on 2 cores
FINETUNE_SEEDS = {"MeZO": (0, 1, 2, 3, 4), "MeZOAdam": (0, 1, 2, 3, 4), "Loren": (0,), "AdaZoSAM": (0, 1)}


def finetune_rows(report: common.Report, device: str, quick: bool) -> None:
    base, train, heldout = _setup(device, quick)
    steps = 30 if quick else 500
    fp32_gain: dict[str, float] = {}
    # (label, probe, stochastic rounding): float32 has one path (rounding does not apply to it)
    paths = {
        "fp32": [("exact", "exact", True)],
        "bf16": [("exact+SR (default)", "exact", True), ("exact, nearest", "exact", False),
                 ("inplace, nearest (old)", "inplace", False)],
    }  # fmt: skip
    for dname in ("fp32", "bf16"):
        model = base.to(DTYPES[dname])
        for name, seeds in FINETUNE_SEEDS.items():
            for label, probe, sr in paths[dname]:
                gain = _finetune_row(report, f"fine-tune {dname} {steps} steps", f"{name} {label}", name, model,
                                     train, heldout, steps, seeds[:1] if quick else seeds, probe, sr, device,
                                     fp32_gain.get(name))  # fmt: skip
                if dname == "fp32":
                    fp32_gain[name] = gain


def autocast_rows(report: common.Report, device: str, quick: bool) -> None:
    """MeZO with float32 weights and updates but the forward in bfloat16 (``torch.autocast``, the
    held-out evaluation too): what the forward's precision alone costs, apart from the weights'."""
    base, train, heldout = _setup(device, quick)
    steps = 30 if quick else 500
    seeds = FINETUNE_SEEDS["MeZO"]

    def loss(model, batch):
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            return lm_loss(model, batch)

    _finetune_row(report, f"fine-tune fp32 weights, bf16 autocast forward {steps} steps", "MeZO exact", "MeZO",
                  base.to(torch.float32), train, heldout, steps, seeds[:1] if quick else seeds, "exact", True,
                  device, None, loss)  # fmt: skip


def _finetune_row(
    report, case, provider, name, model, train, heldout, steps, seeds, probe, sr, device, ref, loss_fn=lm_loss
) -> float:
    """Fine-tune ``model`` with optimizer ``name`` once per seed; one row: the mean held-out gain,
    its standard error, each seed's, and the mean over ``ref`` (the float32 mean) when given."""
    dev = torch.device(device)
    initial = evaluate(model.to(dev), heldout, loss_fn)
    model.cpu()
    gains, times, errors = [], [], []
    for seed in seeds:
        hp = optimizers.Hyper(steps=steps, seed=seed, options={"probe": probe, "stochastic_rounding": sr})
        t0 = time.perf_counter()
        res = finetune(name, model, train, heldout, steps, hp, dev, initial, steps, None, loss_fn=loss_fn)
        times.append((time.perf_counter() - t0) * 1e3 / steps)
        gains.append(initial - res.heldout_loss)
        errors += [res.error] if res.error else []
        print(f"[{time.perf_counter() - _T0:7.0f} s] {case} {provider} seed {seed}: {initial:.4f} -> "
              f"{res.heldout_loss:.4f} ({times[-1]:.0f} ms/step)", file=sys.stderr, flush=True)  # fmt: skip
    mean = sum(gains) / len(gains)
    se = (sum((g - mean) ** 2 for g in gains) / (len(gains) - 1) / len(gains)) ** 0.5 if len(gains) > 1 else None
    report.add(
        case, provider, common.quantiles(times), start=initial, gain=mean, gain_se=se,
        of_fp32=mean / ref if ref else None, seeds=len(gains), gains=" ".join(f"{g:+.4f}" for g in gains),
        error="; ".join(errors) or None,
    )  # fmt: skip
    return mean


def step_rows(report: common.Report, device: str, quick: bool) -> None:
    cfg = parse_size("tiny" if quick else "small")
    dev = torch.device(device)
    tokens = torch.randint(0, cfg.vocab_size, (8, cfg.max_seq_len + 1), device=dev)
    for dname in ("fp32", "bf16"):
        runs = {}
        for probe in PROBES:
            torch.manual_seed(0)
            model = LlamaLM(cfg).to(device=dev, dtype=DTYPES[dname])
            opt = MeZO(model.parameters(), lr=1e-6, seed=0, probe=probe)
            closure = make_closure(lambda model=model: lm_loss(model, tokens))
            opt.step(closure)
            with PeakMemory(dev) as pf:  # inference: the parameters and one forward's activations
                pf.materialize(model)
                with torch.no_grad():
                    closure()
            with PeakMemory(dev) as pm:
                pm.materialize(model)
                opt.step(closure)
            runs[probe] = (model, opt, closure, pf.peak_bytes, pm.peak_bytes)
        # the two paths' steps alternate, so that a load shared with other work falls on both alike
        times: dict[str, list[float]] = {probe: [] for probe in PROBES}
        for _ in range(5 if quick else 20):
            for probe, (_, opt, closure, _, _) in runs.items():
                common.sync(dev)
                t0 = time.perf_counter()
                opt.step(closure)
                common.sync(dev)
                times[probe].append((time.perf_counter() - t0) * 1e3)
        quantiles = {probe: common.quantiles(v) for probe, v in times.items()}
        for probe, (model, _, _, fwd_peak, peak) in runs.items():
            params = module_bytes(model)
            largest = max(p.numel() * p.element_size() for p in model.parameters())
            t = quantiles[probe]
            report.add(
                f"MeZO step {dname}", probe, t, params_MB=params / 2**20, peak_MB=peak / 2**20,
                largest_param_MB=largest / 2**20, peak_over_params=peak / params,
                forward_peak_MB=fwd_peak / 2**20, over_forward_MB=(peak - fwd_peak) / 2**20,
                over_forward_of_params=(peak - fwd_peak) / params, x_inplace=t[0] / quantiles["inplace"][0],
            )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--part", default="drift,finetune,autocast,step", help="comma list of: drift, finetune, step, autocast"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--md", default=None, help="also write the table here, as bench/run_all.py writes its .md")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    parts = {x.strip() for x in args.part.split(",")}
    report = common.Report("lowprec", args.device)
    if "drift" in parts:
        drift_rows(report, args.device, args.quick)
    if "step" in parts:
        step_rows(report, args.device, args.quick)
    if "finetune" in parts:
        finetune_rows(report, args.device, args.quick)
    if "autocast" in parts:
        autocast_rows(report, args.device, args.quick)
    seconds = time.perf_counter() - _T0
    report.finish(args.json)
    if args.md:
        import run_all

        data = {**report.to_json(), "seconds": seconds}
        merged = {"environment": data["environment"], "quick": args.quick, "benches": {"lowprec": data}}
        with open(args.md, "w") as f:
            f.write(
                run_all.markdown(merged).replace(
                    "`bench/run_all.py`", f"`bench/bench_lowprec.py --part {args.part} --md`"
                )
            )


if __name__ == "__main__":
    main()
