"""Batched randomized SVD (subspace refresh) against what GaLore users have today.

Providers (all return the top-r basis of the side GaLore projects on: right when m >= n):
  torch.svd          torch.linalg.svd in float32, one matrix at a time (GaLore's refresh,
                     github.com/jiaweizzhao/GaLore galore_projector.py)
  lowrank.loop       torch.svd_lowrank(A, q=r+p, niter=q) one matrix at a time (global RNG,
                     Householder QR)
  lowrank.batch      torch.svd_lowrank on the stacked matrices of one shape
  ours[<backend>]    lorenza_kernels.randomized_range_list on the whole list (one batched call per
                     shape), forced to <backend> (triton:fused / triton:stored: the two Triton
                     sketches); `ours.svd` is lorenza_kernels.randomized_svd
  gemm roof          the (2 + 2q) products with A alone (k = r + p columns): the bound of docs/kernels.md

Matrices: Llama-style per-layer weights' gradients, q/k/v/o (h x h), gate/up (f x h), down (h x f),
synthetic with a power-law spectrum (sigma_i ~ 1/i: G1 diag(s) G2^T, Gaussian G1, G2).
Metrics: ms per matrix, ms per whole-model refresh, "err over opt %" = 100 (e / e_opt - 1) with
e = ||B - Q Q^T B||_F, e_opt = ||B - B_r||_F (B the matrix oriented to the side; the mean over the
first two matrices of each shape, the first one with --quick), GFLOP/s of the docs/kernels.md count.
Whole-model rows of torch.svd and lowrank.loop are derived (sum over the matrices of the measured
per-shape time): GaLore's loop is exactly that sum; they say `derived`.

  PYTHONPATH=. python bench/bench_rsvd.py [--quick] [--device cpu|cuda] [--threads 1] [--json out.json]
    CPU: h = 1024 (quick) / 2048, f = 2.7 h, 2 / 4 layers;  GPU: h = 4096, f = 11008, 32 layers (7B)
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import lorenza_kernels as lk  # noqa: E402


def config(device: str, quick: bool) -> tuple[int, int, int]:
    """(hidden, intermediate, layers)."""
    if device == "cuda":
        return (4096, 11008, 4) if quick else (4096, 11008, 32)
    return (1024, 2752, 2) if quick else (2048, 5504, 4)


def power_law(m: int, n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    d = min(m, n)
    s = 1.0 / torch.arange(1, d + 1, device=device, dtype=torch.float32)
    g1 = torch.randn(m, d, device=device) / m**0.5
    g2 = torch.randn(n, d, device=device) / n**0.5
    return ((g1 * s) @ g2.T).to(dtype)


def side_of(shape: tuple[int, int]) -> str:
    return "right" if shape[0] >= shape[1] else "left"


def orient(A: torch.Tensor, side: str) -> torch.Tensor:
    return A if side == "left" else A.mT


_OPTIMAL: dict[tuple[int, int], float] = {}


def err_ratio(A: torch.Tensor, Q: torch.Tensor, side: str, rank: int) -> float:
    """||B - Q Q^T B||_F / ||B - B_r||_F; the optimal error is computed once per matrix."""
    key = (id(A), rank)
    if key not in _OPTIMAL:
        _OPTIMAL[key] = torch.linalg.svdvals(A.double())[rank:].square().sum().sqrt().item()
    B = orient(A, side).double()
    return torch.linalg.matrix_norm(B - Q.double() @ (Q.double().mT @ B)).item() / _OPTIMAL[key]


def svd_basis(A: torch.Tensor, side: str, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(A.float(), full_matrices=False)
    _OPTIMAL[(id(A), rank)] = S[rank:].double().square().sum().sqrt().item()  # reused by err_ratio
    return U[:, :rank] if side == "left" else Vh[:rank].mT


def lowrank_basis(A: torch.Tensor, side: str, rank: int, k: int, q: int) -> torch.Tensor:
    return torch.svd_lowrank(orient(A.float(), side), q=k, niter=q)[0][..., :rank]


class Bench:
    """The run's settings and report; one method per table section."""

    def __init__(self, args):
        self.args, self.dev, self.r, self.q = args, args.device, args.rank, args.power_iters
        self.k = args.rank + args.oversample
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
        gpu = self.dev == "cuda"
        # CPU: torch.linalg.svd takes seconds per matrix, so it runs once per shape
        self.slow = dict(warmup=1, rep=3) if gpu else dict(warmup=0, rep=1)
        self.fast = dict(warmup=2, rep=10) if gpu else dict(warmup=1, rep=2 if args.quick else 5)
        here = lk.available_backends("rsvd_sketch")["rsvd_sketch"].get(self.dev, ["reference"])
        backends = args.backends.split(",") if args.backends else here
        # the Triton sketch runs fused (Omega made inside the GEMM) and stored (Triton Omega + cuBLAS)
        self.backends = [v for be in backends for v in (["triton:fused", "triton:stored"] if be == "triton" else [be])]
        self.kw = dict(oversample=args.oversample, power_iters=args.power_iters, seed=1234)
        self.report = common.Report("randomized_svd", self.dev)

    def flops(self, m: int, n: int) -> float:
        return 2 * m * n * self.k * (2 + 2 * self.q)  # docs/kernels.md: (2 + 2q) products with A

    def ours(self, backend: str, mats: list[torch.Tensor], sides: str):
        return lambda: _forced(backend, lambda: lk.randomized_range_list(mats, self.r, sides=sides, **self.kw))

    def single(self, n0: int = 2048) -> None:
        """The headline case: one n0 x n0 matrix."""
        dev, r, k, q = self.dev, self.r, self.k, self.q
        A = power_law(n0, n0, dev, self.dtype)
        case = f"single {n0}x{n0} r{r}"
        X = torch.randn(n0, k, device=dev)
        t_svd = common.measure(lambda: svd_basis(A, "left", r), dev, **self.slow)
        self.report.add(case, "torch.svd", t_svd, **{"speedup vs svd": 1.0, "err over opt %": 0.0})
        rows = [
            ("lowrank.loop", lambda: lowrank_basis(A, "left", r, k, q)),
            *[(f"ours[{be}]", lambda be=be: self.ours(be, [A], "left")()[0]) for be in self.backends],
            ("ours.svd", lambda: lk.randomized_svd(A, r, **self.kw)[0]),
            ("gemm roof", lambda: [A.float() @ X for _ in range(2 + 2 * q)]),
        ]
        for name, fn in rows:
            t = common.measure(fn, dev, **self.fast)
            metrics = {"speedup vs svd": t_svd[0] / t[0], "GFLOP/s": self.flops(n0, n0) / t[0] / 1e6}
            if name != "gemm roof":
                metrics["err over opt %"] = 100 * (err_ratio(A, fn(), "left", r) - 1)
                if not self.args.quick:
                    metrics["extra peak MB"] = common.extra_peak_bytes(fn, dev) / 2**20
            self.report.add(case, name, t, **metrics)
        _progress(case)

    def group(self, name: str, shape: tuple[int, int], ms: list[torch.Tensor]) -> dict[str, float]:
        """All the matrices of one shape; returns the per-provider time of the whole group (ms)."""
        dev, r, k, q, count = self.dev, self.r, self.k, self.q, len(ms)
        side = side_of(shape)
        case = f"{name} {shape[0]}x{shape[1]} r{r} {side} x{count}"
        stacked = torch.stack([m.float() for m in ms])
        X = torch.randn(count, orient(ms[0], side).shape[1], k, device=dev)
        check = ms[:1] if self.args.quick else ms[:2]  # the optimal error costs a CPU SVD per matrix
        gflops = lambda t: count * self.flops(*shape) / t[0] / 1e6  # noqa: E731
        t_svd = common.measure(lambda: svd_basis(ms[0], side, r), dev, **self.slow)
        base = {"ms/matrix": t_svd[0], "speedup vs svd": 1.0, "err over opt %": 0.0}
        self.report.add(case, "torch.svd", t_svd, **base)
        totals = {"torch.svd": t_svd[0] * count}

        t = common.measure(lambda: lowrank_basis(ms[0], side, r, k, q), dev, **self.fast)
        errs = [err_ratio(m, lowrank_basis(m, side, r, k, q), side, r) for m in check]
        self.report.add(case, "lowrank.loop", t, **_per(t, 1, t_svd, errs))
        totals["lowrank.loop"] = t[0] * count
        t = common.measure(lambda: lowrank_basis(stacked, side, r, k, q), dev, **self.fast)
        Qb = lowrank_basis(stacked, side, r, k, q)
        errs = [err_ratio(m, Qb[i], side, r) for i, m in enumerate(check)]
        self.report.add(case, "lowrank.batch", t, **_per(t, count, t_svd, errs))
        totals["lowrank.batch"] = t[0]
        for be in self.backends:
            fn = self.ours(be, ms, side)
            t = common.measure(fn, dev, **self.fast)
            Qs = fn()
            errs = [err_ratio(m, Qs[i], side, r) for i, m in enumerate(check)]
            self.report.add(case, f"ours[{be}]", t, **_per(t, count, t_svd, errs), **{"GFLOP/s": gflops(t)})
        t = common.measure(lambda: [torch.bmm(orient(stacked, side), X) for _ in range(2 + 2 * q)], dev, **self.fast)
        self.report.add(case, "gemm roof", t, **{"ms/matrix": t[0] / count, "GFLOP/s": gflops(t)})
        _progress(case)
        return totals

    def model(self) -> None:
        """Per-shape groups, then the whole model in one call, as the LORENZA optimizer refreshes it."""
        h, f, layers = config(self.dev, self.args.quick)
        groups = [("attn q/k/v/o", (h, h), 4 * layers), ("mlp gate/up", (f, h), 2 * layers)]
        groups.append(("mlp down", (h, f), layers))
        mats = {name: [power_law(*shape, self.dev, self.dtype) for _ in range(n)] for name, shape, n in groups}
        totals: dict[str, float] = {}
        for name, shape, _ in groups:
            for provider, ms in self.group(name, shape, mats[name]).items():
                totals[provider] = totals.get(provider, 0.0) + ms
        everything = [m for name, _, _ in groups for m in mats[name]]
        case = f"model refresh {layers} layers ({len(everything)} matrices, h={h}, f={f}) r{self.r}"
        for name, ms in totals.items():
            label = name + (" (sum of groups)" if name == "lowrank.batch" else " (derived)")
            self.report.add(case, label, (ms,) * 3, **{"speedup vs svd": totals["torch.svd"] / ms})
        for be in self.backends:
            t = common.measure(self.ours(be, everything, "auto"), self.dev, **self.fast)
            self.report.add(case, f"ours[{be}]", t, **{"speedup vs svd": totals["torch.svd"] / t[0]})


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=128)
    p.add_argument("--oversample", type=int, default=8)
    p.add_argument("--power-iters", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--backends", default=None, help="comma list of backends for ours (default: every one here)")
    p.add_argument("--no-single", action="store_true", help="skip the single 2048 x 2048 case")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 on a shared machine: an "
        "OpenMP team whose cores are taken spin-waits, and LAPACK's SVD slows down 50x)",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args)
    if not args.no_single:
        bench.single()
    bench.model()
    bench.report.finish(args.json)


_T0 = time.perf_counter()


def _progress(what: str) -> None:
    print(f"[{time.perf_counter() - _T0:6.1f}s] done: {what}", file=sys.stderr, flush=True)


def _forced(backend: str, fn):
    """Run ``fn`` with ``backend`` forced; ``triton:<mode>`` also picks the Triton sketch mode."""
    name, _, mode = backend.partition(":")
    if mode:
        from lorenza_kernels.triton import rsvd as triton_rsvd

        triton_rsvd.SKETCH = mode
    with lk.use_backend(name):
        return fn()


def _per(t, count: int, t_svd, errs: list[float]) -> dict:
    excess = 100 * (sum(errs) / len(errs) - 1)
    return {"ms/matrix": t[0] / count, "speedup vs svd": t_svd[0] * count / t[0], "err over opt %": excess}


if __name__ == "__main__":
    main()
