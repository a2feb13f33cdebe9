"""Does the zeroth-order ascent of AdaZo-SAM and LORENZA stand in for SAM's? Does LOREN's covariance help?

AdaZo-SAM and LORENZA replace SAM's ascent ``eps = rho grad / ||grad||`` (a second backward pass)
by a zeroth-order estimate from two forward passes per probe. Four measurements (the fourth: does
LOREN's learned covariance help), every one seeded and deterministic (``--threads 1``, the default;
the numbers below are what ``--json`` records):

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
4. **loren** -- does LOREN's learned covariance help per forward pass? MeZO and MeZO-Adam (one
   two-sided probe: 2 forward passes per step) against LOREN (K = 10 one-sided queries: 10 per step;
   mu 1e-3, damping 0.1) in four forms: ``covariance="paper"`` (the published step of ``a``, inert:
   ``a`` keeps its random initialisation; lr_cov 1e-3) and ``"normalized"`` (a step of ``a`` of
   relative size lr_cov, lr_cov in {1e-2, 1e-1} chosen with the lr; the default 1e-3 is left out:
   over the 100 to 500 steps here it can move ``a`` by 10 to 50 % of its norm in all, mostly as a
   random walk), each with heavy-ball momentum 0.9 (the default) and 0, at equal forward passes, on
   three problems:

   - **ls**: least squares in a matrix ``X`` (8 x 8): loss ``0.5 (<A, X> - y)^2`` averaged over
     minibatches of 32 from 2,000 training examples (validation 1,000, test 5,000; data seed 1234),
     features ``vec(A) ~ N(0, H)``, ``H = I + 99 q q^T`` (condition number 100),
     ``q = vec(1 u^T) / sqrt(8)`` with ``u`` a random unit vector, ``y = <A, X*> + 0.1 noise``.
     Why: ``Sigma(a) = (I + a_bar a_bar^T / lambda)^-1`` can only damp a direction ``1 a^T`` (all
     rows alike), so the sharp direction is put there, where ``a = u`` damps it, and it carries 61 %
     of ``tr(H) = 163``, the factor by which the curvature enters the variance of a zeroth-order
     estimate (ZO-SGD's stable lr scales like ``1 / tr(H)``): removing it could allow about 2.6
     times the lr. The start ``X* - e`` has ``e`` orthogonal to ``q`` (excess loss 1): a fine-tune
     from a model already at the bottom of its sharpest direction, where taking that direction out
     of the perturbation costs nothing. An **oracle** LOREN (paper form, so ``a`` stays), whose
     ``a`` is set to ``u ||a_0||`` before the first step, shows what learning ``a`` could give at
     best. 5,000 forwards (LOREN 500 steps, MeZO 2,500), lr grid {3e-4, 1e-3, 3e-3, 1e-2, 3e-2}.
   - **mlp**: the MLP above from its random initialisation, 3,000 forwards, grid {1e-3, 3e-3, 1e-2}
     (in part 3, 3e-4 did worse than 1e-3 for MeZO, MeZO-Adam and LOREN; 3e-2 diverged for every
     optimizer here in a trial run).
   - **lm**: the fine-tune of the transformer above, 1,000 forwards, grid {1e-4, 3e-4, 1e-3} (in
     part 3, 3e-5 did worse than 1e-4 for the three).

   One lr grid per problem, shared by every optimizer. Selection: every (lr, lr_cov) runs with seeds
   0-4, the one with the lowest mean validation loss is chosen (seeds as above; with one seed, every
   LOREN form has the same ``a_0`` and the same queries; ``--quick`` chooses on seed 0). The demo's
   schedule applies to lr, not to lr_cov. Rows: test loss at the full budget (note: at a quarter, a
   half and three quarters of it, checkpoints of the same runs). Rows "a", at the chosen settings:
   ``||a_t|| / ||a_0||`` (mean over the parameters) at 0, 25, 50, 75 and 100 % of the steps,
   ``|cos(a_t, u)|`` (ls; a random ``a`` has 0.29 on average), the mean relative step of ``a``
   (``covariance_steps()``, over parameters and steps), and the share of ``tr(H)`` that
   ``Sigma(a)`` removes, ``sum_p a_bar_p^T H a_bar_p / (lambda + s_p) / tr(H)`` (``tr(H Sigma)``
   is ``tr(H)`` minus it), with ``a_0`` and with the final ``a``, both at the final parameters: ls
   the population Hessian; mlp, lm the Hessian of the validation loss (lm: one batch of 8 windows),
   blocks by autograd, ``tr(H)`` from 8 Rademacher probes. ``||a||`` alone is no evidence of
   learning: a normalized step orthogonal to ``a`` grows it by ``sqrt(1 + lr_cov^2)``. Paired rows:
   per-seed differences of test loss, normalized − paper and oracle − paper (each at its chosen
   settings, and both at the first one's lr: then the only difference is what ``a`` did) and each
   LOREN − MeZO.

Columns: ``median ms``/``p20``/``p80`` one optimizer step (over the runs of the row; alignment:
over its steps; paired rows: none), ``metric`` what ``mean ± se`` (mean and standard error, to
two significant digits of the error) over ``n`` measures, ``lr`` the chosen lr, ``val`` its mean
validation loss, ``note`` the rest (``val by lr``: mean validation loss per lr of the grid, ``*``
the chosen one, ``div`` where a seed diverged). The JSON also holds the rows' numbers
(``details["rows"]``), every run's (``details``) and the settings.

``--quick`` (a few minutes on 2 cores): 1-2 seeds, 2 lrs, short runs; the numbers are a smoke test.

  python bench/bench_ascent.py [--quick] [--part align,mlp,lm,zo,loren] [--problems ls,mlp,lm] [--json out.json]
      [--md out.md] [--threads 1] [--merge earlier.json]

``--merge``: the rows of an earlier JSON whose cases this run did not produce are kept (before this
run's); the environment's ``commit`` then names the commit of each set of parts.
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
    # part "loren": LOREN's covariance (module docstring, part 4)
    ls_shape: tuple[int, int] = (8, 8)
    ls_kappa: float = 100.0
    ls_noise: float = 0.1
    ls_train: int = 2000
    ls_val: int = 1000
    ls_test: int = 5000
    ls_batch: int = 32
    cov_ls_forwards: int = 5000
    cov_mlp_forwards: int = 3000
    cov_lm_forwards: int = 1000
    cov_ls_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    cov_mlp_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    cov_lm_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    cov_lr_covs: tuple[float, ...] = (1e-2, 1e-1)  # covariance="normalized": chosen with the lr
    cov_select_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)  # (lr, lr_cov) chosen on their mean validation loss
    cov_hutchinson: int = 8  # Rademacher probes of tr(H) (MLP, LM)


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
    ls_train=256,
    ls_val=128,
    ls_test=256,
    cov_ls_forwards=200,
    cov_mlp_forwards=100,
    cov_lm_forwards=40,
    cov_ls_grid=(1e-3, 3e-3),
    cov_mlp_grid=(3e-3, 1e-2),
    cov_lm_grid=(1e-4, 3e-4),
    cov_lr_covs=(1e-1,),
    cov_select_seeds=(0,),
    cov_hutchinson=2,
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
        self.curvature_batch = self.val  # part "loren": the Hessian of the validation loss
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
        self.curvature_batch = self.val[0]  # part "loren": the Hessian of one validation batch
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
    extra: dict = field(default_factory=dict)  # what a watcher recorded (part "loren")
    watcher: object = None  # the watcher itself, kept for diagnostics after the selection


def train(task, spec: Spec, lr: float, seed: int, steps: int, probe: str, checkpoints: Sequence[int] = (),
          watch=None) -> Run:  # fmt: skip
    """``steps`` steps of ``spec`` from the task's initial model, the minibatches of (seed, step), the
    demo's warm-up + cosine schedule; validation and test loss at the end (and at ``checkpoints``).
    A non-finite training loss ends the run as diverged (val = test = inf). ``watch(opt, model)``,
    when given, returns an object whose ``after_step(done)`` is called after every step (outside the
    timing) and whose ``record()`` goes to ``Run.extra``."""
    model = task.model(seed)
    opt = build(spec, model, lr, seed, steps, task.rank, probe)
    watcher = watch(opt, model) if watch is not None else None
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
        if watcher is not None:
            watcher.after_step(done)
        if done in checkpoints and done < steps:
            at[done] = (task.evaluate(model, "val"), task.evaluate(model, "test"))
    val, test = (math.inf, math.inf) if diverged else (task.evaluate(model, "val"), task.evaluate(model, "test"))
    if not (math.isfinite(val) and math.isfinite(test)):
        val, test, diverged = math.inf, math.inf, True
    at[steps] = (val, test)
    for c in checkpoints:
        at.setdefault(c, (math.inf, math.inf))
    skipped = int(getattr(opt, "skipped_steps", 0))
    run = Run(val, test, elapsed * 1e3 / max(1, done), counter.forward, skipped, diverged, at)
    if watcher is not None:
        run.extra, run.watcher = watcher.record(), watcher
    return run


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
            text = "div" if not math.isfinite(v) else f"{v:.5f}" if v < 1e3 else f"{v:.1e}"  # blown up, finite
            parts.append(f"{fmt_lr(lr)}{star} {text}")
        return ", ".join(parts)

    def record(self) -> dict:
        return {
            fmt_lr(lr): {s: {"val": r.val, "test": r.test, "skipped": r.skipped, "ms_per_step": r.ms_per_step,
                             **({"at": {k: list(v) for k, v in r.at.items()}} if len(r.at) > 1 else {}),
                             **r.extra}
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
        add_row(report, "alignment " + task.short, provider, common.quantiles(ms), "cos(eps, grad)", m, se,
                len(cos_all), fmt_lr(lr), None, note)  # fmt: skip
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
            report, "generalization " + task.name, spec.label, common.quantiles([r.ms_per_step for r in runs.values()]),
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
        times = common.quantiles([r.ms_per_step for r in runs.values()])
        add_row(
            report, f"ZO {task.name}, {forwards} forwards", spec.label, times,
            "test loss", m, se, len(runs), fmt_lr(best), g.mean_val(best),
            f"{steps} steps; at {half * per_step} forwards {fmt_pm(mh, seh, False)}; val by lr: {g.summary()}"
            + (f"; {skipped} skipped steps in the grid" if skipped else ""),
        )  # fmt: skip
        details[f"ZO {task.short} / {spec.label}"] = g.record()
        log(f"  ZO {task.short} {spec.label}: lr {fmt_lr(best)}, test {m:.4f} ± {se:.4f}")


# ---------------------------------------------------------------- part 4: LOREN's covariance at equal forward passes


class LSModel(nn.Module):
    """``<X, A>`` for a batch of feature matrices ``A`` (``B x m x n``): the least-squares model."""

    def __init__(self, init: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(init.clone())

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats * self.weight).sum((1, 2))


class LSTask:
    """Least squares of condition number ``ls_kappa`` whose one sharp direction lies in LOREN's
    covariance family, started at the bottom of that direction (module docstring, part 4)."""

    def __init__(self, s: Settings):
        self.s = s
        m, n = s.ls_shape
        d = m * n
        f64 = torch.float64
        g = torch.Generator().manual_seed(DATA_SEED)
        u = torch.randn(n, generator=g, dtype=f64)
        self.u = u / u.norm()
        self.q1 = torch.outer(torch.ones(m, dtype=f64), self.u).reshape(-1) / math.sqrt(m)
        basis = torch.randn(d, d, generator=g, dtype=f64)
        basis[:, 0] = self.q1
        q, r = torch.linalg.qr(basis)
        q = q * torch.sign(torch.diagonal(r))  # the first column is q1 itself
        h = torch.ones(d, dtype=f64)
        h[0] = s.ls_kappa
        self.hessian = (q * h) @ q.T  # of the population loss, on vec(X) (row-major)
        total = s.ls_train + s.ls_val + s.ls_test
        feats = torch.randn(total, d, generator=g, dtype=f64) @ ((q * h.sqrt()) @ q.T)
        self.target = torch.randn(d, generator=g, dtype=f64)
        y = feats @ self.target + s.ls_noise * torch.randn(total, generator=g, dtype=f64)
        err = torch.randn(d, generator=g, dtype=f64)
        err -= (err @ self.q1) * self.q1
        err *= math.sqrt(2.0) / err.norm()  # orthogonal to q1, excess loss 0.5 |err|^2 = 1
        self.init = (self.target - err).reshape(m, n).float()
        feats, y = feats.float().reshape(total, m, n), y.float()
        tr, va = s.ls_train, s.ls_train + s.ls_val
        self.train, self.val, self.test = (feats[:tr], y[:tr]), (feats[tr:va], y[tr:va]), (feats[va:], y[va:])
        self.short = f"LS {m}x{n}"
        self.name = f"LS {m}x{n}, condition {s.ls_kappa:g}"
        self.rank = 4  # unused: no low-rank optimizer runs here
        self.order: dict = {}

    def model(self, seed: int) -> nn.Module:
        return LSModel(self.init)  # the same start for every seed

    def batch(self, seed: int, step: int):
        idx = epoch_order(self.order, self.s.ls_train, self.s.ls_batch, seed, step)
        return self.train[0][idx], self.train[1][idx]

    @staticmethod
    def loss(model: nn.Module, batch) -> torch.Tensor:
        return 0.5 * (model(batch[0]) - batch[1]).square().mean()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: str) -> float:
        return float(self.loss(model, getattr(self, split)))


def row_image(a: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``a_bar``: the ``m x n`` matrix whose rows all equal ``a``, in the parameter's shape."""
    m, n = lk.matrix_dims(param)
    return a.reshape(1, n).expand(m, n).reshape(param.shape)


class CovarianceWatch:
    """LOREN's ``a`` during one run: ``||a_t|| / ||a_0||`` (mean over the parameters) and, on the least
    squares, ``|cos(a_t, u)|`` at ``points``; the relative step of ``a`` (``covariance_steps()``,
    mean over parameters and steps); the final parameters and ``a`` (for ``damped_share``).
    ``oracle``: ``a`` is set to ``u ||a_0||`` before the first step (least squares only)."""

    def __init__(self, task, opt, model: nn.Module, points: Sequence[int], oracle: bool = False):
        self.task, self.opt, self.model, self.points = task, opt, model, set(points)
        self.names = {id(p): name for name, p in model.named_parameters()}
        self.params = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
        self.damping = {self.names[id(p)]: float(g["damping"]) for g in opt.param_groups for p in g["params"]}
        # the state step 1 would create (a_0 and the momentum buffers), created now to read a_0
        opt._init_states(opt._slots())
        if oracle:
            for p in self.params:
                a = opt.state[p]["a"]
                a.copy_(task.u.to(a) * a.norm())
        self.a0 = {self.names[id(p)]: opt.state[p]["a"].clone() for p in self.params}
        self.norm, self.cos = {}, {}
        self.step_sum, self.steps = 0.0, 0
        self.look(0)

    def current(self) -> dict[str, torch.Tensor]:
        return {self.names[id(p)]: self.opt.state[p]["a"] for p in self.params}

    def look(self, done: int) -> None:
        a = self.current()
        self.norm[done] = statistics.fmean(float(a[k].norm() / self.a0[k].norm()) for k in a)
        if isinstance(self.task, LSTask):
            (v,) = a.values()
            self.cos[done] = abs(float(v.double() @ self.task.u / v.norm()))

    def after_step(self, done: int) -> None:
        self.step_sum += statistics.fmean(self.opt.covariance_steps().values())
        self.steps += 1
        if done in self.points:
            self.look(done)

    def record(self) -> dict:
        """The numbers for the JSON; keeps copies of the final parameters and ``a`` and lets go of the
        optimizer and the model."""
        self.final = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.a_final = {k: v.clone() for k, v in self.current().items()}
        self.opt = self.model = self.params = None
        out = {"a_norm": dict(self.norm), "a_step": self.step_sum / max(1, self.steps)}
        if self.cos:
            out["cos_a_u"] = dict(self.cos)
        return out


def hessian_forms(task, model: nn.Module, vectors: Sequence[dict[str, torch.Tensor]]) -> list[float]:
    """``v^T H v`` for each ``v`` (parameter name -> tensor, the others zero); ``H`` the Hessian of the
    task's loss on ``task.curvature_batch`` at the model's parameters (autograd, double backward)."""
    named = list(model.named_parameters())
    params = [p for _, p in named]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # twice differentiable
        loss = task.loss(model, task.curvature_batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        out = []
        for vs in vectors:
            dot = sum((g * vs[name]).sum() for (name, _), g in zip(named, grads) if name in vs)
            hv = torch.autograd.grad(dot, params, retain_graph=True, allow_unused=True)
            out.append(
                float(sum((h * vs[name]).sum() for (name, _), h in zip(named, hv) if name in vs and h is not None))
            )
    return out


def damped_share(task, w: CovarianceWatch, probes: int) -> tuple[float, float]:
    """The share of ``tr(H)`` that ``Sigma(a)`` removes, ``sum_p a_bar_p^T H a_bar_p / (lambda + s_p) / tr(H)``
    (``tr(H Sigma) = tr(H) - that``; ``H`` the Hessian at the final parameters), for ``a_0`` and for
    the final ``a``. Least squares: the population Hessian, exactly; otherwise the Hessian of the loss
    on ``task.curvature_batch``, its blocks' quadratic forms by autograd and ``tr(H)`` by ``probes``
    Rademacher vectors (Hutchinson)."""
    model = task.model(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(w.final[name])
    shapes = dict(model.named_parameters())

    def bars(a: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor, float]]:
        return [(k, row_image(v, shapes[k]).double() if isinstance(task, LSTask) else row_image(v, shapes[k]),
                 w.damping[k]) for k, v in a.items()]  # fmt: skip

    sets = [bars(w.a0), bars(w.a_final)]
    if isinstance(task, LSTask):
        hess = task.hessian
        trace = float(torch.trace(hess))
        forms = [[float(v.reshape(-1) @ hess @ v.reshape(-1)) for _, v, _ in bs] for bs in sets]
    else:
        gen = torch.Generator().manual_seed(DATA_SEED)
        rad = [{name: torch.randint(0, 2, p.shape, generator=gen).to(p) * 2 - 1 for name, p in shapes.items()}
               for _ in range(probes)]  # fmt: skip
        flat = [{k: v} for bs in sets for k, v, _ in bs]
        values = hessian_forms(task, model, flat + rad)
        trace = statistics.fmean(values[len(flat) :])
        n = len(sets[0])
        forms = [values[:n], values[n : 2 * n]]
    out = []
    for bs, fs in zip(sets, forms):
        out.append(sum(f / (lam + float(v.square().sum())) for (_, v, lam), f in zip(bs, fs)) / trace)
    return out[0], out[1]


@dataclass(frozen=True)
class Family:
    """An optimizer whose variants (LOREN normalized: one per ``lr_cov``) are chosen among with the lr."""

    label: str
    specs: tuple[Spec, ...]
    per_step: int  # forward passes per step
    loren: bool = False
    oracle: bool = False


def cov_families(s: Settings, task) -> list[Family]:
    K = s.loren_queries

    def loren(form: str, mom: float, lr_cov: float | None = None, tag: str = "") -> Spec:
        opts = (("num_queries", K), ("momentum", mom), ("covariance", form))
        label = f"LOREN {tag or form} m={mom:g}"
        if lr_cov is not None:
            opts += (("lr_cov", lr_cov),)
            label += f" lr_cov={fmt_lr(lr_cov)}"
        return Spec(label, "Loren", rho=0.0, options=opts)

    fams = [Family("MeZO", (Spec("MeZO", "MeZO", rho=0.0),), 2),
            Family("MeZOAdam", (Spec("MeZOAdam", "MeZOAdam", rho=0.0),), 2)]  # fmt: skip
    for mom in (0.9, 0.0):
        fams.append(Family(f"LOREN paper m={mom:g}", (loren("paper", mom),), K, loren=True))
        normalized = tuple(loren("normalized", mom, c) for c in s.cov_lr_covs)
        fams.append(Family(f"LOREN normalized m={mom:g}", normalized, K, loren=True))
        if isinstance(task, LSTask):
            fams.append(Family(f"LOREN oracle m={mom:g}", (loren("paper", mom, tag="oracle"),), K, True, True))
    return fams


@dataclass
class Chosen:
    family: Family
    grids: dict[str, Grid]  # by spec label
    spec: Spec
    lr: float
    steps: int

    @property
    def runs(self) -> dict[int, Run]:
        return self.grids[self.spec.label].runs[self.lr]

    def lr_text(self) -> str:
        lr_cov = dict(self.spec.options).get("lr_cov")
        return fmt_lr(self.lr) + (f", lr_cov {fmt_lr(lr_cov)}" if lr_cov is not None else "")


def run_family(task, fam: Family, s: Settings, lrs: Sequence[float], forwards: int, log) -> Chosen:
    """Every (variant, lr) with the selection seeds; the one of lowest mean validation loss, then with
    every seed."""
    steps = forwards // fam.per_step
    quarters = (steps // 4, steps // 2, 3 * steps // 4)
    kw: dict = {"checkpoints": quarters}
    if fam.loren:
        kw["watch"] = lambda opt, model: CovarianceWatch(task, opt, model, (0, *quarters, steps), fam.oracle)
    grids = {spec.label: run_grid(task, spec, lrs, s.cov_select_seeds, steps, log, **kw) for spec in fam.specs}
    candidates = [(spec, lr) for spec in fam.specs for lr in lrs]
    spec, lr = min(candidates, key=lambda c: grids[c[0].label].mean_val(c[1], s.cov_select_seeds))
    run_grid(task, spec, [lr], s.seeds, steps, log, grid=grids[spec.label], **kw)
    grids[spec.label].chosen = lr
    chosen = Chosen(fam, grids, spec, lr, steps)
    done = {r.forwards for r in chosen.runs.values() if not r.diverged}
    if done - {steps * fam.per_step}:
        raise RuntimeError(f"{fam.label}: forward passes {sorted(done)}, not {steps * fam.per_step}")
    return chosen


def at_lr(task, c: Chosen, lr: float, s: Settings, log) -> dict[int, Run]:
    """The runs of ``c``'s chosen variant at ``lr`` with every seed (run now where missing)."""
    steps, quarters = c.steps, (c.steps // 4, c.steps // 2, 3 * c.steps // 4)
    kw: dict = {"checkpoints": quarters}
    if c.family.loren:
        kw["watch"] = lambda opt, model: CovarianceWatch(task, opt, model, (0, *quarters, steps), c.family.oracle)
    g = c.grids[c.spec.label]
    run_grid(task, c.spec, [lr], s.seeds, steps, log, grid=g, **kw)
    return g.runs[lr]


def fmt_series(values: dict[int, list[float]], fmt: str = "{:.3g}") -> str:
    return ", ".join(fmt.format(statistics.fmean(v)) for _, v in sorted(values.items()))


def covariance_part(report, task, s: Settings, lrs: Sequence[float], forwards: int, log, details: dict) -> None:
    case = f"LOREN cov {task.name}, {forwards} forwards"
    chosen: dict[str, Chosen] = {}
    for fam in cov_families(s, task):
        c = chosen[fam.label] = run_family(task, fam, s, lrs, forwards, log)
        runs = c.runs
        m, se = mean_se([r.test for r in runs.values()])
        quarters = (c.steps // 4, c.steps // 2, 3 * c.steps // 4)
        curve = ", ".join(fmt_pm(*mean_se([r.at[q][1] for r in runs.values()]), False) for q in quarters)
        by_lr = "; ".join(
            (f"lr_cov {fmt_lr(dict(sp.options)['lr_cov'])}: " if len(fam.specs) > 1 else "")
            + c.grids[sp.label].summary(s.cov_select_seeds)
            for sp in fam.specs
        )
        skipped = sum(r.skipped for g in c.grids.values() for rs in g.runs.values() for r in rs.values())
        note = (f"{c.steps} steps; test at {', '.join(str(q * fam.per_step) for q in quarters)} forwards: {curve}; "
                f"val by lr (seeds {','.join(map(str, s.cov_select_seeds))}): {by_lr}"
                + (f"; {skipped} skipped steps in the grid" if skipped else ""))  # fmt: skip
        add_row(report, case, fam.label, common.quantiles([r.ms_per_step for r in runs.values()]), "test loss", m, se,
                len(runs), c.lr_text(), c.grids[c.spec.label].mean_val(c.lr), note)  # fmt: skip
        for label, g in c.grids.items():
            details[f"LOREN cov {task.short} / {label}"] = g.record()
        log(f"  {task.short} {fam.label}: {c.lr_text()}, test {m:.5f} ± {se:.5f}")
    # what a did: its norm, its direction (least squares), its steps, and the share of tr(H) it damps
    for label, c in chosen.items():
        if not c.family.loren:
            continue
        runs = {k: r for k, r in c.runs.items() if not r.diverged}
        first = next(iter(runs.values()))
        norms = {k: [r.extra["a_norm"][k] for r in runs.values()] for k in first.extra["a_norm"]}
        m, se = mean_se(norms[c.steps])
        shares = {k: damped_share(task, r.watcher, s.cov_hutchinson) for k, r in runs.items()}
        d0, d1 = mean_se([x[0] for x in shares.values()]), mean_se([x[1] for x in shares.values()])
        dd = mean_se([x[1] - x[0] for x in shares.values()])
        note = f"‖a‖/‖a₀‖ at 0/25/50/75/100%: {fmt_series(norms, '{:.4g}')}"
        if "cos_a_u" in first.extra:
            cos = {k: [r.extra["cos_a_u"][k] for r in runs.values()] for k in first.extra["cos_a_u"]}
            note += f"; |cos(a, u)|: {fmt_series(cos, '{:.3f}')}"
        note += (f"; mean relative step of a {statistics.fmean(r.extra['a_step'] for r in runs.values()):.2e}"
                 f"; share of tr(H) damped, a₀ {fmt_pm(*d0, False)}, a_T {fmt_pm(*d1, False)}, "
                 f"change {fmt_pm(*dd)}")  # fmt: skip
        add_row(report, f"LOREN cov, a: {task.name}", label, (math.nan,) * 3, "‖a_T‖/‖a₀‖", m, se, len(runs),
                c.lr_text(), None, note)  # fmt: skip
        for seed, x in shares.items():
            details[f"LOREN cov {task.short} / {c.spec.label}"][fmt_lr(c.lr)][seed]["damped_share"] = list(x)
        log(f"  {task.short} {label}: ‖a_T‖/‖a₀‖ {m:.4g}; {note}")
    # paired by seed: each at its chosen settings, and (LOREN pairs) at the first one's lr
    pairs = [(f"LOREN {f} m={mom:g}", f"LOREN paper m={mom:g}") for mom in (0.9, 0.0) for f in ("normalized", "oracle")]
    pairs += [(label, "MeZO") for label, c in chosen.items() if c.family.loren and "oracle" not in label]
    for a, b in pairs:
        if a not in chosen:
            continue
        ca, cb = chosen[a], chosen[b]
        ta, tb = {k: r.test for k, r in ca.runs.items()}, {k: r.test for k, r in cb.runs.items()}
        m, se = mean_se([ta[k] - tb[k] for k in ta])
        note = "each at its chosen settings"
        if cb.family.loren:
            same = at_lr(task, cb, ca.lr, s, log)
            note = f"at the lr {fmt_lr(ca.lr)} of both: {fmt_pm(*mean_se([ta[k] - same[k].test for k in ta]))}"
        add_row(report, f"LOREN cov, paired: {task.name}", f"{a} − {b}", (math.nan,) * 3, "Δ test loss", m, se,
                len(ta), f"{ca.lr_text()} / {cb.lr_text()}", None, note, signed=True)  # fmt: skip
        log(f"  paired {a} − {b}: {fmt_pm(m, se)}; {note}")


# ---------------------------------------------------------------- main


def merge_into(report: AscentReport, path: str) -> None:
    """Put the rows of ``path`` (a JSON of this script) whose cases this run did not produce before this
    run's rows; its details too (this run's win), and the record of which commit ran which parts."""
    import json

    with open(path) as f:
        old = json.load(f)
    mine = {r.case for r in report.rows}
    kept = [common.Row(**r) for r in old["rows"] if r["case"] not in mine]
    report.rows = kept + report.rows
    details = old.get("details", {})
    rows = {k: v for k, v in details.get("rows", {}).items() if k.split(" / ")[0] not in mine}
    parts = details.get("parts") or {
        "align,lm,mlp,zo": {**old["environment"], "seconds": details.get("seconds", math.nan)}
    }
    mine_parts = report.details.pop("parts")
    merged = {**details, **report.details}
    merged["rows"] = {**rows, **report.details.get("rows", {})}
    merged["parts"] = {**{k: v for k, v in parts.items() if k not in mine_parts}, **mine_parts}
    merged["seconds"] = sum(v["seconds"] for v in merged["parts"].values())
    report.details = merged
    report.commits = ", ".join(f"{v['commit']} ({k})" for k, v in merged["parts"].items())


class AscentReport(common.Report):
    """The harness's Report; its JSON also holds the settings and every run's numbers."""

    def __init__(self, bench: str, device, settings: Settings):
        super().__init__(bench, device)
        self.settings = settings
        self.details: dict = {}
        self.commits: str | None = None  # merged results: which commit ran which parts

    def to_json(self) -> dict:
        out = super().to_json()
        if self.commits:
            out["environment"]["commit"] = self.commits
        out["settings"] = dataclasses.asdict(self.settings)
        out["details"] = self.details
        return out


def main(argv: list[str] | None = None) -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--part", default="align,mlp,lm,zo,loren", help="comma list of: align, mlp, lm, zo, loren")
    p.add_argument("--problems", default="ls,mlp,lm", help="part loren: comma list of ls, mlp, lm")
    p.add_argument(
        "--merge", default=None, help="a JSON this script wrote: keep its rows of the cases not rerun, add these"
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: deterministic, shared machine)")
    p.add_argument("--md", default=None, help="also write the table here, as bench/run_all.py writes its .md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    s = QUICK if args.quick else FULL
    parts = {x.strip() for x in args.part.split(",") if x.strip()}
    unknown = parts - {"align", "mlp", "lm", "zo", "loren"}
    if unknown:
        raise SystemExit(f"--part: unknown {sorted(unknown)}")
    problems = [x.strip() for x in args.problems.split(",") if x.strip()] if "loren" in parts else []
    if set(problems) - {"ls", "mlp", "lm"}:
        raise SystemExit(f"--problems: unknown {sorted(set(problems) - {'ls', 'mlp', 'lm'})}")
    device = torch.device(args.device)
    report = AscentReport("ascent", device, s)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f} s] {msg}", flush=True)

    mlp = MLPTask(s)
    lm = LMTask(s, device) if parts & {"align", "lm", "zo"} or "lm" in problems else None
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
    for name in problems:
        task = LSTask(s) if name == "ls" else mlp if name == "mlp" else lm
        grid, forwards = getattr(s, f"cov_{name}_grid"), getattr(s, f"cov_{name}_forwards")
        covariance_part(report, task, s, grid, forwards, log, report.details)
    report.details["seconds"] = time.perf_counter() - t_start
    report.details["parts"] = {
        ",".join(sorted(parts)): {**common.environment(device), "seconds": report.details["seconds"]}
    }
    log("done")
    if args.merge:
        merge_into(report, args.merge)
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
