"""Pre-training (cached) and the fine-tune of one optimizer, with its measurements.

Every fine-tune starts from the same pre-trained weights (a deep copy of one model) and reads the
same minibatch at the same step (``Batches.train(step)`` depends on the seed and the step only).
Every optimizer runs under the same learning-rate schedule (:func:`warmup_cosine`, a torch
``LambdaLR`` on its param groups). Dropout is off everywhere (``model.eval()``): zeroth-order
probes must compare one function.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..integrations.loop import PassCounter, closure_step
from . import optimizers
from .data import Batches
from .memory import PeakMemory, optimizer_state_bytes
from .model import LlamaLM, ModelConfig, lm_loss

CACHE_VERSION = "v1"
PROBE_STEPS = 3  # steps inside the peak-memory window (left out of the timing)


@dataclass
class RunResult:
    optimizer: str
    steps: int
    heldout_loss: float
    perplexity: float
    state_mb: float
    peak_mb: float
    s_per_step: float
    fwd_per_step: float
    bwd_per_step: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, held-out loss), from step 0
    train_loss: list[float] = field(default_factory=list)
    error: str | None = None

    def row(self) -> dict:
        return {k: v for k, v in vars(self).items() if k not in ("curve", "train_loss")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over the first 10% of the steps, then cosine decay to a tenth of the lr."""
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, schedule)


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[torch.Tensor], loss_fn=lm_loss) -> float:
    """Mean next-token loss (``loss_fn(model, batch)``) over the held-out batches (each batch
    weighs the same)."""
    was_training = model.training
    model.eval()
    total = sum(float(loss_fn(model, b)) for b in batches) / max(1, len(batches))
    model.train(was_training)
    return total


def pretrain(
    model: nn.Module, batches: Batches, steps: int, lr: float, device: torch.device, progress=None
) -> list[float]:
    """AdamW (betas 0.9/0.95, weight decay 0.1), :func:`warmup_cosine`, gradients clipped to norm 1."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = warmup_cosine(opt, steps)
    losses = []
    for step in range(steps):
        batch = batches.train(step, device)
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(1, "pretrain", losses[-1])
    return losses


def cached_pretrain(
    cfg: ModelConfig,
    batches: Batches,
    steps: int,
    lr: float,
    device: torch.device,
    fingerprint: str,
    cache_dir: str | None,
    progress_factory=None,
) -> tuple[LlamaLM, dict]:
    """The pre-trained model, from ``cache_dir`` when this exact configuration was trained before.

    The key: model config, steps, lr, batch shape, seed and the corpus fingerprint (so another
    Python's standard library, or another ``--data-root``, trains anew).
    """
    key_fields = {
        "version": CACHE_VERSION,
        "model": cfg.to_dict(),
        "steps": steps,
        "lr": lr,
        "batch": [batches.batch_size, batches.seq_len],
        "seed": batches.seed,
        "data": fingerprint,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir, f"pretrain-{key}.pt") if cache_dir else None
    model = LlamaLM(cfg)
    if path and os.path.exists(path):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(blob["state_dict"])
        return model, {**blob["info"], "cache": path, "cached": True}
    torch.manual_seed(batches.seed)
    model = LlamaLM(cfg).to(device)
    progress = progress_factory(steps, "pretrain") if progress_factory else None
    t0 = time.perf_counter()
    losses = pretrain(model, batches, steps, lr, device, progress)
    if progress is not None:
        progress.close()
    model = model.cpu()
    info = {
        "key": key,
        "fields": key_fields,
        "steps": steps,
        "final_train_loss": sum(losses[-10:]) / len(losses[-10:]),
        "seconds": time.perf_counter() - t0,
    }
    if path:
        os.makedirs(cache_dir, exist_ok=True)
        tmp = path + f".tmp{os.getpid()}"
        torch.save({"state_dict": model.state_dict(), "info": info}, tmp)
        os.replace(tmp, path)  # atomic: a concurrent run never reads half a file
    return model, {**info, "cache": path, "cached": False}


def finetune(
    name: str,
    base_model: nn.Module,
    train: Batches,
    heldout: list[torch.Tensor],
    steps: int,
    hp: optimizers.Hyper,
    device: torch.device,
    initial_loss: float,
    eval_every: int,
    progress=None,
    step_weight: float = 1.0,
    loss_fn=lm_loss,
) -> RunResult:
    """Fine-tune a copy of ``base_model`` with optimizer ``name`` for ``steps`` steps.

    A run whose training loss stops being finite ends early and is reported as diverged in
    ``RunResult.error`` (a result worth showing); any exception is a bug and propagates. Each step
    advances ``progress`` by ``step_weight`` (its estimated seconds, :func:`calibrate`).
    ``loss_fn(model, batch)`` is the loss of the steps and of the held-out evaluation.
    """
    model = copy.deepcopy(base_model).to(device)
    model.eval()
    counter = PassCounter()
    result = RunResult(name, steps, math.nan, math.nan, 0.0, 0.0, math.nan, 0.0, 0.0, curve=[(0, initial_loss)])
    times: list[float] = []
    opt = sched = None

    def one_step(step: int) -> bool:
        batch = train.train(step - 1, device)
        sync(device)
        t0 = time.perf_counter()
        loss = closure_step(opt, lambda: loss_fn(model, batch), counter=counter)
        sync(device)
        times.append(time.perf_counter() - t0)
        sched.step()
        result.train_loss.append(float(loss))
        if step % eval_every == 0 or step == steps:
            result.curve.append((step, evaluate(model, heldout, loss_fn)))
        if progress is not None:
            progress.update(step_weight, name, result.train_loss[-1])
        if not math.isfinite(result.train_loss[-1]):
            result.error = f"diverged: loss {result.train_loss[-1]} at step {step}"
            return False
        return True

    window = min(PROBE_STEPS, steps)
    done = 0
    with PeakMemory(device) as pm:
        pm.materialize(model)
        opt = optimizers.build(name, model, hp)
        sched = warmup_cosine(opt, steps)
        for done in range(1, window + 1):
            if not one_step(done):
                break
    result.peak_mb = pm.peak_bytes / 2**20
    if result.error is None:
        for done in range(window + 1, steps + 1):
            if not one_step(done):
                break
    if progress is not None and done < steps:
        progress.update((steps - done) * step_weight, name, None)  # keep the total honest after an early stop
    result.steps = len(times)
    if opt is not None:
        result.state_mb = optimizer_state_bytes(opt) / 2**20
    timed = times[window:] or times
    result.s_per_step = sum(timed) / len(timed) if timed else math.nan
    result.fwd_per_step = counter.forward / max(1, len(times))
    result.bwd_per_step = counter.backward / max(1, len(times))
    if result.curve[-1][0] != len(times) and result.error is None:
        result.curve.append((len(times), evaluate(model, heldout, loss_fn)))
    result.heldout_loss = result.curve[-1][1] if result.error is None else math.nan
    result.perplexity = math.exp(min(result.heldout_loss, 700.0)) if math.isfinite(result.heldout_loss) else math.nan
    return result


def calibrate(
    names: list[str], base_model: nn.Module, train: Batches, hp: optimizers.Hyper, device: torch.device, steps: int = 3
) -> dict[str, float]:
    """Seconds per step of each optimizer, measured on a copy of the model: the mean of its steps
    after the first (which builds state). The demo weighs its progress and time left with these
    (the optimizers' costs differ tenfold, more than their nominal passes say: LOREN's ten probes
    also regenerate noise); a few steps per optimizer, about 1% of a default run."""
    out = {}
    for name in names:
        model = copy.deepcopy(base_model).to(device)
        model.eval()
        opt = optimizers.build(name, model, hp)
        times = []
        for step in range(steps):
            batch = train.train(step, device)
            sync(device)
            t0 = time.perf_counter()
            closure_step(opt, lambda b=batch, m=model: lm_loss(m, b))
            sync(device)
            times.append(time.perf_counter() - t0)
        later = times[1:] or times
        out[name] = sum(later) / len(later)
        del model, opt
    return out
