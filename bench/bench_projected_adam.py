"""Fused projected Adam (docs/kernels.md section 2) against its baselines and the hardware limit.

Providers, per (dtype, rank):
- ``ours``: ``lorenza_kernels.projected_adam_step_`` (the ``cpu`` backend on the CPU, Triton on CUDA);
- ``galore-unfused``: the reference, GaLore's unfused form (m x n update tensor, a dozen kernels);
- ``adamw-foreach`` / ``adamw-fused``: ``torch.optim.AdamW`` on the full-rank parameter, what the
  memory saving of the projection is paid against.

Limits, measured in the same run: the byte roof (read G, read+write W, read+write M and V, read
Q; for AdamW its own m x n moments) over the copy bandwidth of a large tensor copy, and for the
projected forms the 4 m n r FLOPs of their two GEMMs at the rate of this device's GEMM of the
same shape (float32 on the CPU, whose BLAS the CPU path uses; the parameter's dtype on CUDA).
``limit_frac`` = the larger of the two limits over the measured time; ``roof_frac`` = bytes only.
Side: GaLore's rule (m >= n: right). ``extra_MB``: memory a call allocates beyond what was live.

    python bench/bench_projected_adam.py --quick            # < 2 minutes on 2 CPU cores
    python bench/bench_projected_adam.py --device cuda --json bench/results/projected_adam_h200.json
"""

from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Report, extra_peak_bytes, measure, parser  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # "no compiled extension": not needed here
    import lorenza_kernels as lk  # noqa: E402

NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def copy_bandwidth(device: torch.device, reps: dict) -> tuple[float, tuple[float, float, float]]:
    """(bytes per second, times) of a large tensor copy (read + write): the byte roof."""
    numel = (256 if device.type == "cuda" else 64) << 20 >> 2  # fp32 elements: 256 / 64 MiB
    x = torch.ones(numel, device=device)
    y = torch.empty_like(x)
    t = measure(lambda: y.copy_(x), device, **reps)
    return 2 * x.numel() * 4 / (t[0] * 1e-3), t


def gemm_rate(m: int, n: int, r: int, dtype: torch.dtype, device: torch.device, reps: dict) -> float:
    """FLOP/s of the down-projection GEMM G Q (m x n times n x r) on this device."""
    dt = dtype if device.type == "cuda" else torch.float32
    g = torch.randn(m, n, device=device).to(dt)
    q = torch.randn(n, r, device=device).to(dt)
    ms = measure(lambda: g @ q, device, **reps)[0]
    return 2 * m * n * r / (ms * 1e-3)


def case_tensors(m, n, r, dtype, device):
    """W, G, Q (orthonormal n x r: side right), M, V (m x r, float32)."""
    w = torch.randn(m, n, device=device).to(dtype)
    g = torch.randn(m, n, device=device).to(dtype)
    q = torch.linalg.qr(torch.randn(n, r, device=device))[0].to(dtype)
    return w, g, q, torch.zeros(m, r, device=device), torch.zeros(m, r, device=device)


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=None, help="m = n (default 4096 on CUDA, 2048 on the CPU)")
    p.add_argument("--ranks", default="128,256,512")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (the CPU is shared: say so)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or (4096 if device.type == "cuda" else (1024 if args.quick else 2048))
    ranks = [int(x) for x in args.ranks.split(",")]
    reps = dict(warmup=1, rep=3) if args.quick and device.type == "cpu" else dict(warmup=2, rep=7)
    report = Report("projected_adam", device)
    bw, t = copy_bandwidth(device, reps)
    report.add("copy 256MiB" if device.type == "cuda" else "copy 64MiB", "roof", t, GBps=bw / 1e9)
    m = n = size
    for dtype in (torch.float32, torch.bfloat16):
        es = torch.tensor([], dtype=dtype).element_size()
        for r in ranks:
            case = f"{m}x{n} r{r} {NAMES[dtype]}"
            w, g, q, ma, va = case_tensors(m, n, r, dtype, device)
            # bytes: G read, W read+write, M and V read+write (fp32), Q read
            proj_bytes = m * n * es * 3 + 4 * m * r * 4 + n * r * es
            flops = 4 * m * n * r
            rate = gemm_rate(m, n, r, dtype, device, reps)
            step = [0]

            def ours(backend=None):
                step[0] += 1
                with lk.use_backend(backend):
                    lk.projected_adam_step_(w, g, q, ma, va, step=step[0], lr=1e-4, weight_decay=0.01,
                                            scale=0.25, side="right")  # fmt: skip

            providers = {"ours": ours, "galore-unfused": lambda: ours("reference")}
            for fused in (False, True):
                prm = torch.nn.Parameter(torch.randn(m, n, device=device).to(dtype))
                prm.grad = torch.randn_like(prm)
                try:
                    opt = torch.optim.AdamW([prm], lr=1e-4, weight_decay=0.01, foreach=not fused, fused=fused or None)
                    opt.step()  # allocates the state: not part of the timed step
                except (RuntimeError, ValueError) as exc:
                    print(f"skip adamw fused={fused} on {dtype}: {exc}")
                    continue
                providers["adamw-fused" if fused else "adamw-foreach"] = opt.step
            for name, fn in providers.items():
                t = measure(fn, device, **reps)
                s = t[0] * 1e-3
                if name.startswith("adamw"):
                    nbytes, limit = m * n * es * 3 + 4 * m * n * es, m * n * es * 7 / bw
                    tflops = None
                else:
                    nbytes, limit = proj_bytes, max(proj_bytes / bw, flops / rate)
                    tflops = flops / s / 1e12
                report.add(
                    case, name, t, MB=nbytes / 1e6, GBps=nbytes / s / 1e9, roof_frac=nbytes / bw / s,
                    TFLOPs=tflops, limit_frac=limit / s, extra_MB=extra_peak_bytes(fn, device) / 1e6,
                )  # fmt: skip
            report.add(case, "gemm G@Q", (2e3 * m * n * r / rate,) * 3, TFLOPs=rate / 1e12)
            providers = w = g = q = ma = va = None  # free this case before the next
    report.finish(args.json)


if __name__ == "__main__":
    main()
