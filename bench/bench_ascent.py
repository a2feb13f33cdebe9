"""Does the zeroth-order ascent of AdaZo-SAM and LORENZA stand in for SAM's? Alignment, generalization, ZO.

AdaZo-SAM and LORENZA replace SAM's ascent ``eps = rho grad / ||grad||`` (a second backward pass)
by a zeroth-order estimate from two forward passes per probe. Three measurements, every one seeded
and deterministic (``--threads 1``, the default; the numbers below are what ``--json`` records):

1. **align** -- alignment of the ascent with the gradient. The MLP below, each optimizer training
   it for 100 steps (constant lr 1e-3, 4e-3 for the projected optimizers whose update is scaled by
   0.25; seeds 0, 1, 2; rho 0.05, mu 1e-3, the default ``probe="exact"``; LORENZA rank 16, bases
   refreshed every 20 updates, the registry's ``steps // 5``). At every 5th step: ``g`` =
   autograd's gradient of the step's minibatch loss at theta, and ``eps`` = the parameters at
   which the optimizer's closure runs its backward pass (recorded inside the closure when
   ``torch.is_grad_enabled()``; SAM: its second backward pass) minus theta, flattened over all
   parameters. Row: mean and standard error of ``cos(eps, g)`` over the 60 (step, seed)
   measurements (treated as independent), ``|eps|`` (rho by construction: a zero ascent from a
   skipped step would show here; skipped steps are an error), the dimension of the space the
   probes are drawn from, and for LORENZA the share of ``|eps|^2`` on the projected matrices and
   the cosine restricted to them. A random direction's expected ``|cos|`` is
   ``sqrt(2 / (pi d))`` (0.0029 for d = 76,810); ``q`` probes of the full space reach about
   ``sqrt(q / d)``. Two more sets of rows: LORENZA on a bias-free variant of the MLP with rank 8,
   where every parameter is a projected matrix (no dense parameter in the probe), and the
   one-probe rows on the fine-tune of the transformer below (seeds 0, 1; 40 steps, every 4th
   measured; lr 1e-4, 3e-4 projected; bases refreshed every 8 updates).
2. **mlp**, **lm** -- generalization where sharpness matters, every optimizer of the list
   ``GEN_SPECS`` (AdamW, SAM around AdamW, AdaZo-SAM with ``probe_space`` "full" and "momentum",
   GaLore-AdamW, LORENZA "singular" and "subspace", Lorenza+ "singular", and LORENZA with rho = 0
   in both probe spaces) built by the demo's registry (``lorenza.demo.optimizers``: weight decay
   0, the registry's low-rank grouping, scale 0.25, Lorenza+'s residual 0.025, GaLore's exact SVD,
   LORENZA's randomized SVD), rho 0.05, mu 1e-3, ``probe="inplace"`` (float32: the mathematics of
   the exact path to rounding, twice as fast on the CPU), the demo's schedule (10 % linear
   warm-up, cosine to a tenth). For each optimizer every lr of the model's grid runs with seeds
   0-4 (the seed sets the initialisation, the data order and the probe noise: runs with one seed
   are paired); the lr with the lowest mean validation loss is chosen and its test loss reported
   (mean +- standard error over the 5 seeds). Paired rows: the per-seed difference of test losses,
   rho 0.05 minus rho 0 (AdaZo-SAM at rho = 0 is AdamW, checked bitwise before the runs; SAM minus
   AdamW as the positive control; and the probe spaces against each other), each at its own
   chosen lr, and in the note at every lr of the grid (``*``: the first optimizer's chosen lr).

   - **mlp**: a 32-256-256-10 ReLU MLP (76,810 parameters; rank 16: the 256x32 and 256x256 weights
     are projected, the 10x256 head and the biases dense). Data (seed 1234): x ~ N(0, I_32), class
     ``argmax(tanh(x A) B)`` of a random teacher (A 32x64, B 64x10); 2,000 training examples with
     15 % of the labels flipped to a uniformly drawn other class; 1,000 validation and 5,000 test
     examples with clean labels (the selection targets the quantity the test reports). Batch 64,
     600 steps (19 epochs: the runs memorise noise at the larger lrs), lr grid {3e-4, 1e-3, 3e-3,
     1e-2}, bases refreshed every 120 updates. Test: cross-entropy on the clean test labels.
   - **lm**: the demo's "tiny" Llama-style byte model (dim 64, 2 layers, 4 heads, sequence 64,
     123,200 parameters), pre-trained by the demo's cached ``cached_pretrain`` (1,000 AdamW steps,
     lr 3e-3, batch 8, on the standard library's pre-training part; ``~/.cache/lorenza-demo`` or
     ``$LORENZA_DEMO_CACHE``), then fine-tuned on 128 windows of 65 bytes spread evenly over the
     fine-tuning train part (a small set: 100 steps of batch 8 are 6 epochs, so the fine-tune can
     overfit), lr grid {3e-5, 1e-4, 3e-4, 1e-3}, rank 16 on the blocks' matrices (embedding and
     norms dense), bases refreshed every 20 updates. Validation: 64 windows of the first half of
     the demo's held-out modules; test: 128 windows of the second half (next-byte cross-entropy).
3. **zo** -- LOREN (K = 10 one-sided queries, K forward passes per step, the public code's other
   defaults) against MeZO and MeZO-Adam (one two-sided probe, 2 forward passes per step), mu 1e-3,
   at an equal number of forward passes: 3,000 on the MLP (from its random initialisation), 1,000
   on the fine-tune of the transformer (from the pre-trained model); same data, schedule and
   seeds as above. lr grids shared by the three: {3e-4, 1e-3, 3e-3, 1e-2} (MLP), {1e-5, 3e-5,
   1e-4, 3e-4} (LM), every lr with seeds 0-4, the lr with the lowest mean validation loss chosen.
   Test loss at the full budget, and (note) at half of it: a checkpoint of the same run, under the
   schedule of the full run.

Columns: ``median ms``/``p20``/``p80`` one optimizer step (over the runs of the row; alignment:
over its steps; paired rows: none), ``metric`` what ``mean ± se`` (mean and standard error, to
two significant digits of the error) over ``n`` measures, ``lr`` the chosen lr, ``val`` its mean
validation loss, ``note`` the rest (``val by lr``: mean validation loss per lr of the grid, ``*``
the chosen one, ``div`` where a seed diverged). The JSON also holds the rows' numbers
(``details["rows"]``), every run's (``details``) and the settings.

``--quick`` (a few minutes on 2 cores): 1-2 seeds, 2 lrs, short runs; the numbers are a smoke test.

  python bench/bench_ascent.py [--quick] [--part align,mlp,lm,zo] [--json out.json] [--md out.md] [--threads 1]
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common

try:
    import lorenza.demo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python_api"))

import lorenza_kernels as lk
from lorenza.demo import optimizers
from lorenza.demo.data import Batches, byte_tokens, load_corpus
from lorenza.demo.model import lm_loss, parse_size
from lorenza.demo.train import cached_pretrain, evaluate, warmup_cosine
from lorenza.integrations.loop import PassCounter, closure_step

MU = 1e-3  # probe scale of every zeroth-order method
RHO = 0.05  # radius of SAM, AdaZo-SAM, LORENZA, Lorenza+
DATA_SEED = 1234  # the MLP task's data, the same for every run


# ---------------------------------------------------------------- settings


@dataclass(frozen=True)
class Align:
    seeds: tuple[int, ...]
    steps: int
    every: int
    lr: float  # dense optimizers
    lowrank_lr: float  # projected optimizers (their update is scaled by 0.25)


@dataclass(frozen=True)
class Settings:
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    # alignment: (seeds, steps, measure every, lr of the dense optimizers, of the projected ones)
    align_mlp: Align = Align((0, 1, 2), 100, 5, 1e-3, 4e-3)
    align_lm: Align = Align((0, 1), 40, 4, 1e-4, 3e-4)
    mlp_train: int = 2000
    mlp_val: int = 1000
    mlp_test: int = 5000
    mlp_batch: int = 64
    mlp_steps: int = 600
    mlp_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    lm_size: str = "tiny"
    lm_pre_steps: int = 1000
    lm_train_windows: int = 128
    lm_batch: int = 8
    lm_steps: int = 100
    lm_val_windows: int = 64
    lm_test_windows: int = 128
    lm_grid: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3)
    zo_mlp_forwards: int = 3000
    zo_lm_forwards: int = 1000
    zo_mlp_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2)
    zo_lm_grid: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4)
    loren_queries: int = 10


FULL = Settings()
QUICK = Settings(
    seeds=(0, 1),
    align_mlp=Align((0,), 20, 5, 1e-3, 4e-3),
    align_lm=Align((0,), 8, 4, 1e-4, 3e-4),
    mlp_steps=100,
    mlp_grid=(1e-3, 3e-3),
    lm_steps=16,
    lm_val_windows=16,
    lm_test_windows=16,
    lm_grid=(3e-4, 1e-3),
    zo_mlp_forwards=400,
    zo_lm_forwards=120,
    zo_mlp_grid=(1e-3, 3e-3),
    zo_lm_grid=(3e-5, 1e-4),
)


# ---------------------------------------------------------------- optimizers


@dataclass(frozen=True)
class Spec:
    """An optimizer of the demo's registry with its rho and constructor options."""

    label: str
    name: str
    rho: float = RHO
    options: tuple[tuple[str, object], ...] = ()

    @property
    def lowrank(self) -> bool:
        return optimizers.SPECS[self.name].lowrank


def build(spec: Spec, model: nn.Module, lr: float, seed: int, steps: int, rank: int, probe: str):
    hp = optimizers.Hyper(
        steps=steps, rank=rank, rho=spec.rho, mu=MU, seed=seed, lr={spec.name: lr},
        options={"probe": probe, **dict(spec.options)},
    )  # fmt: skip
    return optimizers.build(spec.name, model, hp)


# ---------------------------------------------------------------- tasks


def epoch_order(cache: dict, n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """Indices of minibatch ``step``: epochs of ``n // batch`` minibatches, each a permutation drawn
    from (seed, epoch), so that the data order depends on the seed only."""
    epoch, k = divmod(step, n // batch)
    if (seed, epoch) not in cache:
        cache.clear()
        cache[(seed, epoch)] = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return cache[(seed, epoch)][k * batch : (k + 1) * batch]


class MLPTask:
    """The 32-256-256-10 ReLU MLP on the noisy-label teacher task (module docstring)."""

    def __init__(self, s: Settings, *, bias: bool = True, rank: int = 16):
        self.s, self.bias, self.rank = s, bias, rank
        self.short = f"MLP-{round(self.num_params() / 1000)}k" + ("" if bias else f" no bias, rank {rank}")
        self.name = self.short + ", 15% flipped labels"
        g = torch.Generator().manual_seed(DATA_SEED)
        n = s.mlp_train + s.mlp_val + s.mlp_test
        a = torch.randn(32, 64, generator=g) / math.sqrt(32)
        b = torch.randn(64, 10, generator=g) / math.sqrt(64)
        x = torch.randn(n, 32, generator=g)
        y = (torch.tanh(x @ a) @ b).argmax(1)
        noisy = y.clone()
        flip = torch.rand(n, generator=g) < 0.15
        noisy[flip] = (y[flip] + torch.randint(1, 10, (n,), generator=g)[flip]) % 10
        tr, va = s.mlp_train, s.mlp_train + s.mlp_val
        self.train = (x[:tr], noisy[:tr])
        self.val = (x[tr:va], y[tr:va])
        self.test = (x[va:], y[va:])
        self.order: dict = {}

    def num_params(self) -> int:
        return sum(p.numel() for p in self.model(0).parameters())

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        b = self.bias
        return nn.Sequential(
            nn.Linear(32, 256, bias=b), nn.ReLU(), nn.Linear(256, 256, bias=b), nn.ReLU(), nn.Linear(256, 10, bias=b)
        )

    def batch(self, seed: int, step: int):
        idx = epoch_order(self.order, self.s.mlp_train, self.s.mlp_batch, seed, step)
        return self.train[0][idx], self.train[1][idx]

    @staticmethod
    def loss(model: nn.Module, batch) -> torch.Tensor:
        return F.cross_entropy(model(batch[0]), batch[1])

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> float:
        return float(self.loss(model, getattr(self, split)))


class LMTask:
    """The demo's transformer, pre-trained (cached) and fine-tuned on a small set (module docstring)."""

    def __init__(self, s: Settings, device: torch.device):
        self.s, self.device = s, device
        corpus = load_corpus()
        cfg = parse_size(s.lm_size)
        self.short = self.name = f"LM {s.lm_size}"
        self.seq = cfg.max_seq_len
        pre = Batches(byte_tokens(corpus.text["pretrain"]), self.seq, 8, 1)
        cache = os.environ.get("LORENZA_DEMO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lorenza-demo")
        self.base, self.pre_info = cached_pretrain(cfg, pre, s.lm_pre_steps, 3e-3, device, corpus.fingerprint, cache)
        self.base.eval()
        windows = Batches(byte_tokens(corpus.text["train"]), self.seq, 1, 0).heldout(s.lm_train_windows)
        self.pool = torch.cat(windows)
        held = byte_tokens(corpus.text["heldout"])
        half = held.numel() // 2
        self.val = Batches(held[:half], self.seq, s.lm_batch, 0).heldout(s.lm_val_windows, device)
        self.test = Batches(held[half:], self.seq, s.lm_batch, 0).heldout(s.lm_test_windows, device)
        self.rank = optimizers.default_rank(self.base)
        self.order: dict = {}

    def model(self, seed: int) -> nn.Module:
        return copy.deepcopy(self.base).to(self.device)  # every run starts from the pre-trained weights

    def batch(self, seed: int, step: int) -> torch.Tensor:
        return self.pool[epoch_order(self.order, self.pool.shape[0], self.s.lm_batch, seed, step)].to(self.device)

    @staticmethod
    def loss(model: nn.Module, batch) -> torch.Tensor:
        return lm_loss(model, batch)

    def evaluate(self, model: nn.Module, split: str) -> float:
        return evaluate(model, getattr(self, split))


# ---------------------------------------------------------------- statistics


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    m = statistics.fmean(vals)
    se = statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 and math.isfinite(m) else math.nan
    return m, se


def quantiles(ms: Sequence[float]) -> tuple[float, float, float]:
    xs = sorted(ms)
    if not xs:
        return math.nan, math.nan, math.nan

    def q(p: float) -> float:
        return xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]

    return statistics.median(xs), q(0.2), q(0.8)


def fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def decimals(se: float) -> int:
    """Decimals that show two significant digits of the standard error (4 when there is none)."""
    if not (math.isfinite(se) and se > 0):
        return 4
    return min(8, max(2, 1 - math.floor(math.log10(se))))


def fmt_pm(m: float, se: float, signed: bool = True) -> str:
    """``m ± se`` to the precision of ``se``; ``div`` when a run diverged."""
    if not math.isfinite(m):
        return "div"
    d = decimals(se)
    return (
        f"{m:{'+' if signed else ''}.{d}f} ± {se:.{d}f}" if math.isfinite(se) else f"{m:{'+' if signed else ''}.{d}f}"
    )


# ---------------------------------------------------------------- one training run


@dataclass
class Run:
    val: float
    test: float
    ms_per_step: float
    forwards: int
    skipped: int
    diverged: bool
    at: dict[int, tuple[float, float]] = field(default_factory=dict)  # step -> (val, test)


def train(task, spec: Spec, lr: float, seed: int, steps: int, probe: str, checkpoints: Sequence[int] = ()) -> Run:
    """``steps`` steps of ``spec`` from the task's initial model, the minibatches of (seed, step), the
    demo's warm-up + cosine schedule; validation and test loss at the end (and at ``checkpoints``).
    A non-finite training loss ends the run as diverged (val = test = inf)."""
    model = task.model(seed)
    opt = build(spec, model, lr, seed, steps, task.rank, probe)
    sched = warmup_cosine(opt, steps)
    counter = PassCounter()
    at: dict[int, tuple[float, float]] = {}
    diverged, elapsed, done = False, 0.0, 0
    for step in range(steps):
        batch = task.batch(seed, step)
        t0 = time.perf_counter()
        loss = closure_step(opt, lambda: task.loss(model, batch), counter=counter)
        elapsed += time.perf_counter() - t0
        sched.step()
        done = step + 1
        if not math.isfinite(float(loss)):
            diverged = True
            break
        if done in checkpoints and done < steps:
            at[done] = (task.evaluate(model, "val"), task.evaluate(model, "test"))
    val, test = (math.inf, math.inf) if diverged else (task.evaluate(model, "val"), task.evaluate(model, "test"))
    if not (math.isfinite(val) and math.isfinite(test)):
        val, test, diverged = math.inf, math.inf, True
    at[steps] = (val, test)
    for c in checkpoints:
        at.setdefault(c, (math.inf, math.inf))
    skipped = int(getattr(opt, "skipped_steps", 0))
    return Run(val, test, elapsed * 1e3 / max(1, done), counter.forward, skipped, diverged, at)


class Grid:
    """The runs of one optimizer by lr and seed, and the lr chosen on validation."""

    def __init__(self) -> None:
        self.runs: dict[float, dict[int, Run]] = {}
        self.chosen: float | None = None

    def mean_val(self, lr: float, seeds: Sequence[int] | None = None) -> float:
        vals = [r.val for s, r in self.runs[lr].items() if seeds is None or s in seeds]
        return statistics.fmean(vals) if vals and all(math.isfinite(v) for v in vals) else math.inf

    def choose(self, seeds: Sequence[int] | None = None) -> float:
        """The lr with the lowest mean validation loss over ``seeds`` (all: None); ties to the smaller."""
        self.chosen = min(sorted(self.runs), key=lambda lr: self.mean_val(lr, seeds))
        return self.chosen

    def tests(self, lr: float | None = None) -> dict[int, float]:
        return {s: r.test for s, r in self.runs[self.chosen if lr is None else lr].items()}

    def summary(self, seeds: Sequence[int] | None = None) -> str:
        parts = []
        for lr in self.runs:
            v = self.mean_val(lr, seeds)
            star = "*" if lr == self.chosen else ""
            parts.append(f"{fmt_lr(lr)}{star} {v:.5f}" if math.isfinite(v) else f"{fmt_lr(lr)}{star} div")
        return ", ".join(parts)

    def record(self) -> dict:
        return {
            fmt_lr(lr): {s: {"val": r.val, "test": r.test, "skipped": r.skipped, "ms_per_step": r.ms_per_step,
                             **({"at": {k: list(v) for k, v in r.at.items()}} if len(r.at) > 1 else {})}
                         for s, r in rs.items()}
            for lr, rs in self.runs.items()
        }  # fmt: skip


def run_grid(task, spec: Spec, lrs: Sequence[float], seeds: Sequence[int], steps: int, log, grid: Grid | None = None,
             **kw) -> Grid:  # fmt: skip
    grid = grid or Grid()
    for lr in lrs:
        runs = grid.runs.setdefault(lr, {})
        for seed in seeds:
            if seed not in runs:
                runs[seed] = train(task, spec, lr, seed, steps, "inplace", **kw)
        log(f"  {task.short} {spec.label} lr {fmt_lr(lr)}: val {grid.mean_val(lr, seeds):.4f} ({len(seeds)} seeds)")
    return grid


def add_row(report, case, provider, times, metric, m, se, n, lr, val, note, signed=False) -> None:
    """One row: ``mean ± se`` as text to the precision of its standard error (the harness would print
    three significant digits, too few for losses that differ in the fourth decimal); the numbers
    themselves go to the JSON's ``details["rows"]``."""
    metrics = {"metric": metric, "mean ± se": fmt_pm(m, se, signed), "n": n, "lr": lr}
    metrics["val"] = f"{val:.5f}" if val is not None and math.isfinite(val) else ("div" if val is not None else "")
    metrics["note"] = note
    report.add(case, provider, times, **metrics)
    report.details.setdefault("rows", {})[f"{case} / {provider}"] = {"mean": m, "se": se, "n": n, "val": val}


# ---------------------------------------------------------------- part 1: alignment


def _probe(space: str, q: int = 1) -> tuple[tuple[str, object], ...]:
    return (("probe_space", space),) + ((("num_probes", q),) if q > 1 else ())


ALIGN_SPECS = [
    (Spec("SAM", "SAM"), 1),
    (Spec("AdaZoSAM full", "AdaZoSAM", options=_probe("full")), 1),
    (Spec("AdaZoSAM full", "AdaZoSAM", options=_probe("full", 8)), 8),
    (Spec("AdaZoSAM momentum", "AdaZoSAM", options=_probe("momentum")), 1),
    (Spec("Lorenza singular", "Lorenza", options=_probe("singular")), 1),
    (Spec("Lorenza singular", "Lorenza", options=_probe("singular", 8)), 8),
    (Spec("Lorenza subspace", "Lorenza", options=_probe("subspace")), 1),
    (Spec("Lorenza subspace", "Lorenza", options=_probe("subspace", 8)), 8),
]


def probe_dim(spec: Spec, opt, params: Sequence[torch.Tensor]) -> int:
    """Dimension of the space the probes are drawn from (the ascent lies in it)."""
    space = dict(spec.options).get("probe_space")
    if space == "momentum":
        return 1
    total = 0
    for p in params:
        st = opt.state.get(p, {}) if spec.lowrank else {}
        if "proj" in st:
            m, n = lk.matrix_dims(p)
            r = st["proj"].shape[1]
            total += r if space == "singular" else r * max(m, n)
        else:
            total += p.numel()
    return total


def alignment(report, task, a: Align, specs, log, details: dict) -> None:
    """cos(eps, g): g autograd's gradient of the step's minibatch loss at theta, eps read off the
    parameters at which the closure runs its backward pass (module docstring)."""
    for spec, q in specs:
        cos_all, cos_proj, norms, ms, dims, shares, steps_seen = [], [], [], [], [], [], []
        lr = a.lowrank_lr if spec.lowrank else a.lr
        for seed in a.seeds:
            model = task.model(seed)
            params = list(model.parameters())
            opt = build(spec, model, lr, seed, a.steps, task.rank, "exact")
            seen: list[list[torch.Tensor]] = []
            for step in range(1, a.steps + 1):
                batch = task.batch(seed, step - 1)
                measure = step % a.every == 0 and step > 1  # LORENZA's step 1 has no ascent by design

                def loss_fn():
                    loss = task.loss(model, batch)
                    if measure and torch.is_grad_enabled():
                        seen.append([p.detach().clone() for p in params])  # the perturbed value, both probe paths
                    return loss

                if measure:
                    theta = [p.detach().clone() for p in params]
                    g = torch.autograd.grad(task.loss(model, batch), params)
                    seen.clear()
                t0 = time.perf_counter()
                closure_step(opt, loss_fn)
                ms.append((time.perf_counter() - t0) * 1e3)
                if not measure:
                    continue
                if not seen:
                    raise RuntimeError(f"{spec.label}: the closure never ran with gradients at step {step}")
                eps = [a - b for a, b in zip(seen[-1], theta)]  # SAM: its second backward pass, at theta + e
                e, gv = torch.cat([x.reshape(-1) for x in eps]), torch.cat([x.reshape(-1) for x in g])
                cos_all.append(float(e @ gv / (e.norm() * gv.norm())))
                norms.append(float(e.norm()))
                steps_seen.append(step)
                if spec.lowrank:
                    proj = [k for k, p in enumerate(params) if "proj" in opt.state.get(p, {})]
                    ep = torch.cat([eps[k].reshape(-1) for k in proj])
                    gp = torch.cat([g[k].reshape(-1) for k in proj])
                    shares.append(float(ep.square().sum() / e.square().sum()))
                    cos_proj.append(float(ep @ gp / (ep.norm() * gp.norm())) if ep.norm() > 0 else 0.0)
            dims.append(probe_dim(spec, opt, params))
            if getattr(opt, "skipped_steps", 0):
                raise RuntimeError(f"{spec.label}: {opt.skipped_steps} skipped steps")
        m, se = mean_se(cos_all)
        note = f"‖eps‖ {statistics.fmean(norms):.4f} (rho {spec.rho}), probe dim {dims[0]}"
        if shares:
            pm, pse = mean_se(cos_proj)
            note += f"; projected matrices: {statistics.fmean(shares):.1%} of ‖eps‖², cos there {pm:.3f} ± {pse:.3f}"
        provider = spec.label + ("" if spec.name == "SAM" else f" q={q}")
        add_row(report, "alignment " + task.short, provider, quantiles(ms), "cos(eps, grad)", m, se, len(cos_all),
                fmt_lr(lr), None, note)  # fmt: skip
        details[f"alignment {task.short} / {provider}"] = {
            "step": steps_seen,
            "cos": cos_all,
            "cos_projected": cos_proj,
        }
        log(f"  alignment {task.short} {provider}: cos {m:.4f} ± {se:.4f}; {note}")


# ---------------------------------------------------------------- part 2: generalization


GEN_SPECS = [
    Spec("AdamW", "AdamW", rho=0.0),
    Spec("SAM", "SAM"),
    Spec("AdaZoSAM full", "AdaZoSAM", options=_probe("full")),
    Spec("AdaZoSAM momentum", "AdaZoSAM", options=_probe("momentum")),
    Spec("GaLoreAdamW", "GaLoreAdamW", rho=0.0),
    Spec("Lorenza singular", "Lorenza", options=_probe("singular")),
    Spec("Lorenza subspace", "Lorenza", options=_probe("subspace")),
    Spec("LorenzaPlus singular", "LorenzaPlus", options=_probe("singular")),
    Spec("Lorenza singular rho=0", "Lorenza", rho=0.0, options=_probe("singular")),
    Spec("Lorenza subspace rho=0", "Lorenza", rho=0.0, options=_probe("subspace")),
]
# (with the ascent, without it): AdaZo-SAM at rho = 0 is AdamW (checked bitwise)
PAIRS = [
    ("SAM", "AdamW"),
    ("AdaZoSAM full", "AdamW"),
    ("AdaZoSAM momentum", "AdamW"),
    ("Lorenza singular", "Lorenza singular rho=0"),
    ("Lorenza subspace", "Lorenza subspace rho=0"),
    ("AdaZoSAM momentum", "AdaZoSAM full"),  # the probe spaces against each other
    ("Lorenza singular", "Lorenza subspace"),
]


def check_adazo_rho0_is_adamw(task) -> None:
    """The pairs use AdamW as AdaZo-SAM(rho=0): the same parameters after a few steps, bitwise."""
    out = []
    for spec in (Spec("AdamW", "AdamW", rho=0.0), Spec("AdaZoSAM", "AdaZoSAM", rho=0.0)):
        model = task.model(0)
        opt = build(spec, model, 1e-3, 0, 10, task.rank, "inplace")
        for step in range(5):
            batch = task.batch(0, step)
            closure_step(opt, lambda: task.loss(model, batch))
        out.append([p.detach().clone() for p in model.parameters()])
    if not all(torch.equal(a, b) for a, b in zip(*out)):
        raise RuntimeError("AdaZoSAM(rho=0) is not AdamW: the paired differences would not be rho's effect")


def generalization(report, task, s: Settings, lrs: Sequence[float], steps: int, log, details: dict) -> None:
    grids: dict[str, Grid] = {}
    for spec in GEN_SPECS:
        g = grids[spec.label] = run_grid(task, spec, lrs, s.seeds, steps, log)
        best = g.choose()
        runs = g.runs[best]
        m, se = mean_se([r.test for r in runs.values()])
        skipped = sum(r.skipped for rs in g.runs.values() for r in rs.values())
        note = "val by lr: " + g.summary() + (f"; {skipped} skipped steps in the grid" if skipped else "")
        add_row(
            report, "generalization " + task.name, spec.label, quantiles([r.ms_per_step for r in runs.values()]),
            "test loss", m, se, len(runs), fmt_lr(best), g.mean_val(best), note,
        )  # fmt: skip
        details[f"generalization {task.short} / {spec.label}"] = g.record()
        log(f"  {task.short} {spec.label}: lr {fmt_lr(best)}, test {m:.4f} ± {se:.4f}")
    for a, b in PAIRS:
        ga, gb = grids[a], grids[b]
        ta, tb = ga.tests(), gb.tests()
        m, se = mean_se([ta[k] - tb[k] for k in ta])
        per_lr = []
        for lr in lrs:
            la, lb = ga.tests(lr), gb.tests(lr)
            per_lr.append(
                f"{fmt_lr(lr)}{'*' if lr == ga.chosen else ''} {fmt_pm(*mean_se([la[k] - lb[k] for k in la]))}"
            )
        add_row(
            report, "paired " + task.name, f"{a} − {b}", (math.nan, math.nan, math.nan), "Δ test loss", m, se,
            len(ta), f"{fmt_lr(ga.chosen)} / {fmt_lr(gb.chosen)}", None, "same lr: " + ", ".join(per_lr),
            signed=True,
        )  # fmt: skip
        log(f"  paired {a} − {b}: {fmt_pm(m, se)}; same lr: {', '.join(per_lr)}")


# ---------------------------------------------------------------- part 3: zeroth-order at equal forward passes


def zo_specs(s: Settings) -> list[tuple[Spec, int]]:
    """(spec, forward passes per step)."""
    loren = Spec(f"LOREN K={s.loren_queries}", "Loren", rho=0.0, options=(("num_queries", s.loren_queries),))
    return [(Spec("MeZO", "MeZO", rho=0.0), 2), (Spec("MeZOAdam", "MeZOAdam", rho=0.0), 2), (loren, s.loren_queries)]


def zeroth_order(report, task, s: Settings, lrs: Sequence[float], forwards: int, log, details: dict) -> None:
    for spec, per_step in zo_specs(s):
        steps = forwards // per_step
        half = steps // 2
        g = run_grid(task, spec, lrs, s.seeds, steps, log, checkpoints=(half,))
        best = g.choose()
        runs = g.runs[best]
        if {r.forwards for r in runs.values() if not r.diverged} - {steps * per_step}:
            raise RuntimeError(f"{spec.label}: forward passes {[r.forwards for r in runs.values()]}, not {forwards}")
        m, se = mean_se([r.test for r in runs.values()])
        mh, seh = mean_se([r.at[half][1] for r in runs.values()])
        skipped = sum(r.skipped for rs in g.runs.values() for r in rs.values())
        times = quantiles([r.ms_per_step for r in runs.values()])
        add_row(
            report, f"ZO {task.name}, {forwards} forwards", spec.label, times,
            "test loss", m, se, len(runs), fmt_lr(best), g.mean_val(best),
            f"{steps} steps; at {half * per_step} forwards {fmt_pm(mh, seh, False)}; val by lr: {g.summary()}"
            + (f"; {skipped} skipped steps in the grid" if skipped else ""),
        )  # fmt: skip
        details[f"ZO {task.short} / {spec.label}"] = g.record()
        log(f"  ZO {task.short} {spec.label}: lr {fmt_lr(best)}, test {m:.4f} ± {se:.4f}")


# ---------------------------------------------------------------- main


class AscentReport(common.Report):
    """The harness's Report; its JSON also holds the settings and every run's numbers."""

    def __init__(self, bench: str, device, settings: Settings):
        super().__init__(bench, device)
        self.settings = settings
        self.details: dict = {}

    def to_json(self) -> dict:
        out = super().to_json()
        out["settings"] = dataclasses.asdict(self.settings)
        out["details"] = self.details
        return out


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--part", default="align,mlp,lm,zo", help="comma list of: align, mlp, lm, zo")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: deterministic, shared machine)")
    p.add_argument("--md", default=None, help="also write the table here, as bench/run_all.py writes its .md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    parts = {x.strip() for x in args.part.split(",") if x.strip()}
    unknown = parts - {"align", "mlp", "lm", "zo"}
    if unknown:
        raise SystemExit(f"--part: unknown {sorted(unknown)}")
    device = torch.device(args.device)
    report = AscentReport("ascent", device, s)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    mlp = MLPTask(s)
    lm = LMTask(s, device) if parts & {"align", "lm", "zo"} else None
    if lm is not None:
        before = {split: lm.evaluate(lm.base, split) for split in ("val", "test")}
        report.details["LM pre-trained"] = {**before, "cached": bool(lm.pre_info.get("cached"))}
        log(f"{lm.name} pre-trained ({'cached' if lm.pre_info.get('cached') else 'trained now'}): "
            f"val {before['val']:.4f}, test {before['test']:.4f} before fine-tuning")  # fmt: skip
    if "align" in parts:
        alignment(report, mlp, s.align_mlp, ALIGN_SPECS, log, report.details)
        all_projected = MLPTask(s, bias=False, rank=8)
        alignment(report, all_projected, s.align_mlp, [x for x in ALIGN_SPECS if x[0].lowrank], log, report.details)
        alignment(report, lm, s.align_lm, [x for x in ALIGN_SPECS if x[1] == 1], log, report.details)
    if "mlp" in parts:
        check_adazo_rho0_is_adamw(mlp)
        generalization(report, mlp, s, s.mlp_grid, s.mlp_steps, log, report.details)
    if "lm" in parts:
        generalization(report, lm, s, s.lm_grid, s.lm_steps, log, report.details)
    if "zo" in parts:
        init = mlp.model(0)
        report.details["MLP initial"] = {split: mlp.evaluate(init, split) for split in ("val", "test")}
        zeroth_order(report, mlp, s, s.zo_mlp_grid, s.zo_mlp_forwards, log, report.details)
        zeroth_order(report, lm, s, s.zo_lm_grid, s.zo_lm_forwards, log, report.details)
    report.details["seconds"] = time.perf_counter() - t_start
    log("done")
    report.finish(args.json)
    if args.md:
        import run_all

        data = {**report.to_json(), "seconds": report.details["seconds"]}
        merged = {"environment": data["environment"], "quick": args.quick, "benches": {"ascent": data}}
        text = run_all.markdown(merged).replace("`bench/run_all.py`", "`bench/bench_ascent.py --md`")
        with open(args.md, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
