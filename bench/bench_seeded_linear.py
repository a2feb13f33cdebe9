"""seeded_linear (a probe's F.linear with the noise made inside the GEMM) against materialising W + mu z.

Providers, for y = x W'^T + b' with W' = W + alpha z_W (seeded, docs/kernels.md section 4):
  ours          lorenza_kernels.seeded_linear: on CUDA the Triton kernel (noise generated in the K loop,
                no weight-sized temporary); on the CPU there is no fast backend and the reference runs,
                which IS the materialise path below (the two rows then measure the same thing)
  materialise   what callers have today: a copy of W and b, seeded_axpby_ on it (one extra read and
                write of the weight, a weight-sized temporary), then F.linear (cuBLAS / CPU BLAS)
  F.linear      the unperturbed layer: the roof (a GEMM with nothing else to do)

Metrics: TFLOP/s of the GEMM (2 M N K), the time over F.linear's ("x roof"), the regenerations of the
noise per weight element (ceil(M / BLOCK_M) for ours on CUDA, 1 for materialise) and, without
--quick, the extra peak memory of a call beyond its output. Shapes are Llama-7B layers (q/k/v/o
4096 x 4096, gate/up 11008 x 4096, down 4096 x 11008) for batches of M tokens; small ones on the CPU.

  PYTHONPATH=. python bench/bench_seeded_linear.py [--quick] [--device cpu|cuda] [--dtypes bf16,fp32]
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import lorenza_kernels as lk  # noqa: E402
from lorenza_kernels import _registry  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def shapes(device: str, quick: bool) -> tuple[list[tuple[int, int]], list[int]]:
    """((out, in) layer shapes, token counts M)."""
    if device == "cuda":
        if quick:
            return [(4096, 4096), (11008, 4096)], [16, 512, 4096]
        return [(4096, 4096), (11008, 4096), (4096, 11008)], [1, 16, 128, 512, 2048, 8192]
    if quick:
        return [(512, 512)], [16, 128]
    return [(1024, 1024), (2752, 1024)], [16, 256]


def regenerations(device: str, M: int, N: int, K: int, dtype: torch.dtype) -> int:
    """How many times ours generates each weight element's noise: once per tile of x rows."""
    if device != "cuda" or _registry.active("seeded_linear", "cuda") != "triton":
        return 1
    from lorenza_kernels.triton.seeded_linear import config

    return math.ceil(M / config(M, N, K, dtype)["BLOCK_M"])


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: bf16 on CUDA, fp32 on CPU)")
    args = p.parse_args()
    device = args.device
    dtypes = args.dtypes.split(",") if args.dtypes else (["bf16"] if device == "cuda" else ["fp32"])
    layers, tokens = shapes(device, args.quick)
    report = common.Report("seeded_linear", device)
    backend = _registry.active("seeded_linear", torch.device(device).type)
    if backend == "reference":
        print(
            f"bench_seeded_linear: no fast seeded_linear backend on {device}: `ours` runs the reference, which "
            "is the materialise path (copy, seeded_axpby_, F.linear); both rows measure the same thing."
        )
    fast = dict(warmup=2, rep=5 if args.quick else 10) if device != "cuda" else {}
    seed, alpha, ws, bs = 1234, 1e-3, 10, 11

    for name in dtypes:
        dtype = DTYPES[name]
        for N, K in layers:
            w = torch.randn(N, K, device=device).to(dtype)
            b = torch.randn(N, device=device).to(dtype)
            for M in tokens:
                x = torch.randn(M, K, device=device).to(dtype)

                def ours():
                    return lk.seeded_linear(x, w, b, seed=seed, alpha=alpha, weight_stream=ws, bias_stream=bs)

                def materialise():
                    wp, bp = w.clone(), b.clone()
                    lk.seeded_axpby_([wp, bp], seed, alpha, 1.0, streams=[ws, bs])
                    return F.linear(x, wp, bp)

                def roof():
                    return F.linear(x, w, b)

                case = f"{name} M={M} {N}x{K}"
                flops = 2.0 * M * N * K
                out_bytes = M * N * w.element_size()
                t_roof = common.measure(roof, device, **fast)
                providers = [
                    (f"ours[{backend}]", ours, regenerations(device, M, N, K, dtype)),
                    ("materialise", materialise, 1),
                    ("F.linear", roof, 0),
                ]
                for label, fn, regen in providers:
                    t = t_roof if fn is roof else common.measure(fn, device, **fast)
                    metrics = {"TFLOP/s": flops / t[0] / 1e9, "x roof": t[0] / t_roof[0], "noise regen": regen}
                    if not args.quick:
                        metrics["extra peak MB"] = max(0, common.extra_peak_bytes(fn, device) - out_bytes) / 2**20
                    report.add(case, label, t, **metrics)
                print(f"  done: {case}", flush=True)
    report.finish(args.json)


if __name__ == "__main__":
    main()
