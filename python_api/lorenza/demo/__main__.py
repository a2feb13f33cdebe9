"""``python -m lorenza.demo``: pre-train a small Llama-style model on the Python standard library's
sources, fine-tune it on a held-apart part with every optimizer, and compare them in one table.

Budget (``--budget``): ``steps`` (default) gives every optimizer the same number of steps on the
same minibatches, and the table shows what a step costs (forward/backward passes, seconds);
``compute`` gives each the same forward-pass equivalents as AdamW's ``--steps`` (a backward pass
counted as two forwards, the registry's nominal passes per step), so MeZO takes 1.5x the steps and
LOREN (10 forwards) 0.3x. Steps is the default because it holds the data fixed (every optimizer
sees exactly the same minibatches) and the cost is then read off the table; the PNG's right panel
puts every curve on the forward-pass-equivalent axis, so both comparisons are on one page.

Table columns: held-out loss (mean next-token cross-entropy over fixed held-out windows, nats) and
its perplexity; opt state MB (every tensor in ``optimizer.state``, SAM's base optimizer included);
peak MB (parameters + gradients + state + activations over the first 3 steps, see
:mod:`lorenza.demo.memory`); s/step (mean wall time of ``optimizer.step(closure)`` after those
steps); fwd/step and bwd/step (closure calls counted, not assumed).

Defaults: ``--quick`` tiny model (0.12M parameters), 400 pre-training and 60 fine-tuning steps;
CPU small (0.84M) on 64-token sequences, 500 and 100; GPU base (25M), 3000 and 300. On the CPU
torch runs one thread unless ``--threads`` says otherwise. The pre-trained model is cached
(``--cache``), so only the first run pays for pre-training. Before fine-tuning, a few steps of
each optimizer are timed (:func:`lorenza.demo.train.calibrate`): the run prints its estimated
time, and the progress line weighs each step by its optimizer's cost.

Outputs under ``--out``: ``results.json`` (rows, curves, configuration, environment) and
``loss_curves.png`` (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time

import torch

from . import optimizers
from .data import Batches, byte_tokens, hf_tokens, load_corpus
from .memory import module_bytes
from .model import parse_size
from .report import Progress, plot_curves, table, warmup_bump, write_json
from .train import cached_pretrain, calibrate, evaluate, finetune

# (model size, fine-tune steps, pre-train steps, batch, held-out batches, sequence length) per setting.
# CPU: sequences of 64 tokens (the model takes 128) make a step 2.5x cheaper than 128 on one thread
# (0.10 s against 0.24 s for an AdamW step of the small model, measured on the 2-core CI machine),
# which keeps the default run, pre-training included, well under 10 minutes there.
DEFAULTS = {
    "quick": ("tiny", 60, 400, 16, 4, None),
    "cpu": ("small", 100, 500, 8, 4, 64),
    "cuda": ("base", 300, 3000, 32, 16, None),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m lorenza.demo",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny model, few steps: all optimizers in < 3 min on 2 CPU cores"
    )
    p.add_argument("--optimizers", default="all", help=f"comma list from {','.join(optimizers.NAMES)} (default all)")
    p.add_argument("--steps", type=int, default=None, help="fine-tuning steps (per optimizer, see --budget)")
    p.add_argument(
        "--budget", choices=["steps", "compute"], default="steps", help="same steps, or same forward-pass equivalents"
    )
    p.add_argument("--model-size", default=None, help="tiny | small | base | dims: dim=256,layers=4,heads=4[,seq=..]")
    p.add_argument(
        "--model", default=None, metavar="PATH", help="fine-tune a local Hugging Face causal LM (no download)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None, help="output directory (default runs/demo-<size>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrain-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="default: 64 on the CPU, the model's max_seq_len on a GPU (128 for --model)",
    )
    p.add_argument("--eval-batches", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None, help="default: a tenth of the steps")
    p.add_argument("--lr", default="", help="per-optimizer learning rates: NAME=VALUE[,NAME=VALUE]")
    p.add_argument("--rank", type=int, default=0, help="low-rank optimizers' rank (default: width/4)")
    p.add_argument("--update-interval", type=int, default=0, help="subspace refresh interval (default: steps/5)")
    p.add_argument(
        "--cache", default=None, help="pre-training cache dir (default $LORENZA_DEMO_CACHE or ~/.cache/lorenza-demo)"
    )
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--data-root", default=None, help="a directory of .py files to use instead of the standard library")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default on the CPU: 1; the demo's small ops gain little from threads and lose "
        "much when the cores are shared: 2 threads made a step 2.5-4x slower on the 2-core CI machine)",
    )
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device here")
    setting = "quick" if args.quick else ("cuda" if args.device.startswith("cuda") else "cpu")
    size, steps, pre_steps, batch, eval_batches, seq = DEFAULTS[setting]
    if args.seq_len is None and args.model_size is None and not args.model:
        args.seq_len = seq
    args.model_size = args.model_size or size
    args.steps = args.steps if args.steps is not None else steps
    args.pretrain_steps = args.pretrain_steps if args.pretrain_steps is not None else pre_steps
    args.batch_size = args.batch_size or (8 if args.model else batch)
    args.eval_batches = args.eval_batches or eval_batches
    args.eval_every = args.eval_every or max(1, args.steps // 10)
    try:
        args.optimizer_names = optimizers.resolve(args.optimizers)
    except ValueError as e:
        p.error(f"--optimizers: {e}")
    args.lrs = {}
    for item in (i.strip() for i in args.lr.split(",") if i.strip()):
        name, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            p.error(f"--lr {item!r}: expected NAME=VALUE with a number, e.g. --lr Lorenza=1e-3")
        if not (lr >= 0.0 and math.isfinite(lr)):
            p.error(f"--lr {item!r}: the learning rate must be a finite number >= 0")
        try:
            args.lrs[optimizers.resolve(name)[0]] = lr
        except ValueError as e:
            p.error(f"--lr {item!r}: {e}")
    if not args.model:
        try:
            parse_size(args.model_size)
        except (ValueError, TypeError) as e:
            p.error(str(e) if str(e).startswith("--model-size") else f"--model-size {args.model_size!r}: {e}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    return args


def load_hf(path: str, device: torch.device):
    """A local Hugging Face causal LM and its tokenizer; never downloads."""
    if not os.path.isdir(path):
        raise SystemExit(f"--model {path!r}: not a local directory (the demo never downloads models)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise SystemExit(f"--model needs the optional package transformers (pip install transformers): {e}") from e
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # float32 whatever the checkpoint: a zeroth-order probe of mu = 1e-3 is lost in bf16 rounding.
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).float()
    return model, tokenizer


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(args.device)
    t_start = time.perf_counter()
    corpus = load_corpus(args.data_root)
    print(
        f"data: {corpus.root} (Python {corpus.meta['python']}): "
        + ", ".join(
            f"{k} {corpus.meta['modules'][k]} modules {v / 1e6:.2f} MB" for k, v in corpus.meta["bytes"].items()
        )
    )
    make_progress = lambda total, desc: Progress(total, desc, enabled=not args.no_progress)

    if args.model:
        base_model, tokenizer = load_hf(args.model, device)
        encode, seq_len, model_desc = hf_tokens(tokenizer), args.seq_len or 128, f"{args.model}"
        pre_info: dict = {"pretrained": args.model}
    else:
        cfg = parse_size(args.model_size)
        seq_len = min(args.seq_len or cfg.max_seq_len, cfg.max_seq_len)
        encode, model_desc = byte_tokens, f"Llama-style {args.model_size}: {cfg.num_params() / 1e6:.2f}M params"
        cache = (
            None
            if args.no_cache
            else (
                args.cache
                or os.environ.get("LORENZA_DEMO_CACHE")
                or os.path.join(os.path.expanduser("~"), ".cache", "lorenza-demo")
            )
        )
        pre_batches = Batches(encode(corpus.text["pretrain"]), seq_len, args.batch_size, args.seed + 1)
        base_model, pre_info = cached_pretrain(
            cfg, pre_batches, args.pretrain_steps, 3e-3, device, corpus.fingerprint, cache, make_progress
        )
        print(
            f"pre-training: {'loaded ' + pre_info['cache'] if pre_info['cached'] else 'done'}"
            f" ({pre_info['steps']} steps, final train loss {pre_info['final_train_loss']:.3f})"
        )
    n_params = sum(p.numel() for p in base_model.parameters())
    train = Batches(encode(corpus.text["train"]), seq_len, args.batch_size, args.seed)
    heldout = Batches(encode(corpus.text["heldout"]), seq_len, args.batch_size, args.seed).heldout(
        args.eval_batches, device
    )
    initial = evaluate(base_model.to(device), heldout)
    base_model.cpu()
    print(
        f"model: {model_desc} ({module_bytes(base_model) / 2**20:.1f} MB); "
        f"fine-tune: {args.batch_size} x {seq_len} tokens "
        f"per step, held-out: {len(heldout)} batches; pre-trained held-out loss {initial:.4f}"
    )

    hp = optimizers.Hyper(
        steps=args.steps, rank=args.rank, update_interval=args.update_interval, seed=args.seed, lr=args.lrs
    )
    plan = {}
    for name in args.optimizer_names:
        if args.budget == "compute":
            plan[name] = max(1, round(args.steps * optimizers.cost("AdamW") / optimizers.cost(name)))
        else:
            plan[name] = args.steps
    per_step = calibrate(list(plan), base_model, train, hp, device)
    estimate = {name: per_step[name] * plan[name] for name in plan}
    print(
        f"estimated fine-tune time: ~{sum(estimate.values()):.0f} s ("
        + ", ".join(f"{n} {v:.0f} s" for n, v in estimate.items())
        + "; measured over a few steps each, evaluations not included)"
    )
    progress = make_progress(sum(estimate.values()), "fine-tune")
    results = []
    for name, steps in plan.items():
        hp.steps = steps
        results.append(
            finetune(
                name, base_model, train, heldout, steps, hp, device, initial, args.eval_every, progress, per_step[name]
            )
        )
    progress.close()

    rows = [r.row() for r in results]
    out = args.out or os.path.join(
        "runs", f"demo-{'hf' if args.model else args.model_size.replace(',', '_').replace('=', '')}"
    )
    costs = {r.optimizer: r.fwd_per_step + 2 * r.bwd_per_step for r in results}
    title = f"{model_desc}, {args.budget} budget, {device.type}"
    zeroth = {r.optimizer for r in results if r.bwd_per_step == 0}
    curves = {r.optimizer: r.curve for r in results}
    png = plot_curves(os.path.join(out, "loss_curves.png"), curves, costs, title, initial, zeroth)
    bump = warmup_bump(curves, initial, [n for n in curves if n not in zeroth])
    payload = {
        "config": {k: v for k, v in vars(args).items() if k not in ("optimizer_names",)},
        "environment": {
            "device": device.type,
            "cuda": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "data": {"root": corpus.root, "fingerprint": corpus.fingerprint, **corpus.meta},
        "model": {"description": model_desc, "params": n_params},
        "pretraining": pre_info,
        "pretrained_heldout_loss": initial,
        "rows": rows,
        "curves": {r.optimizer: r.curve for r in results},
        "train_loss": {r.optimizer: r.train_loss for r in results},
        "seconds": time.perf_counter() - t_start,
    }
    write_json(os.path.join(out, "results.json"), payload)

    print(
        f"\n## Fine-tuning {model_desc} on held-apart stdlib modules, {args.budget} budget, {device.type}"
        f" (pre-trained held-out loss {initial:.4f}, ppl {math.exp(initial):.2f})"
    )
    print(table(rows))
    if bump > 0.01:
        print(
            f"The gradient-taking optimizers' held-out loss first rises (by up to {bump:.2f} here) and then falls: "
            "during the warm-up their rate climbs to a peak several times the rate pre-training ended at, with Adam "
            "moments estimated from a few minibatches, which moves the weights off the pre-trained minimum; the "
            "cosine decay then brings them down past it. The peak rates were chosen by the final held-out loss "
            "(lorenza/demo/optimizers.py); a rate small enough to avoid the rise ends higher after this many steps "
            "(measured in the README, 'The demo')."
        )
    for r in results:
        if r.error:
            print(f"failed {r.optimizer}: {r.error}")
    print(
        f"peak MB: {'CUDA max_memory_allocated' if device.type == 'cuda' else 'live tensor storages'} over the first "
        "3 steps (params + grads + optimizer state + activations; lorenza/demo/memory.py); "
        "opt state MB: tensors in optimizer.state; s/step: mean over the later steps"
    )
    print(
        f"wrote {os.path.join(out, 'results.json')}"
        + (f" and {png}" if png else " (no PNG: matplotlib is not installed)")
        + f"; {payload['seconds']:.0f} s in all"
    )
    return payload


if __name__ == "__main__":
    main()
