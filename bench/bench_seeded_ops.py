"""seeded_axpby_ against what MeZO users have today, and against the bandwidth roof.

Providers, on one list of tensors shaped like a transformer's parameters:
  mezo         torch.manual_seed, then per tensor z = torch.normal(...) into a new tensor and an
               out-of-place update p = p + alpha z (MeZO's perturbation; github.com/princeton-nlp/MeZO)
  mezo_inplace the same with p.add_(z, alpha=alpha)
  ours[<be>]   lorenza_kernels.seeded_axpby_ forced to backend <be> (one pass, noise never stored)
  ours+SR[<be>] the same with a rounding_seed: 16-bit tensors rounded stochastically (docs/rng.md,
               "The rounding stream"; one more Philox call per 4 elements); rows for bf16/fp16 only
  roof         p.add_(1.0) over the same list: one read and one write of every byte

Each row: median/p20/p80 ms, elements/s, effective GB/s (2 x bytes of the list per pass, for every
provider, so they compare), the fraction of the roof, the speedup over `mezo`, and the extra peak
memory of the call (allocations beyond the parameters themselves).

For bf16/fp16 a second case writes float32 images back into the list (what an optimizer does after
an AdamW update of float32 copies):
  round[<be>]  lorenza_kernels.stochastic_round_(params, images, seed) forced to backend <be>
  copy (roof)  p.copy_(image) for every tensor: the same bytes (4 read, 2 written per element),
               rounded to nearest

  python bench/bench_seeded_ops.py [--quick] [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import lorenza_kernels as lk  # noqa: E402
from lorenza_kernels import _registry  # noqa: E402


def transformer_like(d: int, blocks: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """Per block: q, k, v, o (d x d), SwiGLU gate/up (f x d) and down (d x f), two norms (d)."""
    f = (8 * d // 3 + 63) // 64 * 64
    shapes = []
    for _ in range(blocks):
        shapes += [(d, d)] * 4 + [(f, d), (f, d), (d, f), (d,), (d,)]
    return [torch.randn(s, device=device).to(dtype) for s in shapes]


def sizes(device: str, quick: bool) -> tuple[int, int]:
    if device == "cuda":
        return (1024, 8) if quick else (2048, 24)  # 24 x 2048: 1.2e9 elements, 2.4 GB in bf16
    return (256, 8) if quick else (512, 24)  # 24 x 512: 7.6e7 elements on the CPU


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--backends", default=None, help="comma list; default: every non-reference backend here")
    p.add_argument("--with-reference", action="store_true", help="also time the (slow) reference")
    args = p.parse_args()
    device = args.device
    d, blocks = sizes(device, args.quick)
    rep = 5 if args.quick else 10
    report = common.Report("seeded_axpby_", device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    backends = (
        args.backends.split(",")
        if args.backends
        else [b for b in lk.available_backends("seeded_axpby_")["seeded_axpby_"].get(device, []) if b != "reference"]
    )
    if args.with_reference:
        backends.append("reference")
    alpha, seed, rseed = 1e-3, 1234, 5678

    for name in args.dtypes.split(","):
        dtype = dtypes[name]
        params = transformer_like(d, blocks, dtype, device)

        def fresh_params():
            # Out-of-place providers swap tensors; the memory probe must see them allocated.
            params[:] = [t.clone() for t in params]

        numel = sum(t.numel() for t in params)
        nbytes = 2 * sum(t.numel() * t.element_size() for t in params)
        case = f"{name} {len(params)} tensors {numel / 1e6:.1f}M el"

        def mezo():
            torch.manual_seed(seed)
            for t in params:
                z = torch.normal(0.0, 1.0, size=t.shape, device=t.device, dtype=t.dtype)
                t.data = t.data + alpha * z

        def mezo_inplace():
            torch.manual_seed(seed)
            for t in params:
                z = torch.normal(0.0, 1.0, size=t.shape, device=t.device, dtype=t.dtype)
                t.add_(z, alpha=alpha)

        def roof():
            for t in params:
                t.add_(1.0)

        providers = [("mezo", mezo), ("mezo_inplace", mezo_inplace)]
        for be in backends:

            def ours(be=be):
                with lk.use_backend(be):
                    lk.seeded_axpby_(params, seed, alpha)

            def ours_sr(be=be):
                with lk.use_backend(be):
                    lk.seeded_axpby_(params, seed, alpha, rounding_seed=rseed)

            with lk.use_backend(be):
                if _registry.active("seeded_axpby_", torch.device(device).type) != be:
                    print(f"skip ours[{be}]: not available on {device}")
                    continue
            providers.append((f"ours[{be}]", ours))
            if dtype != torch.float32:
                providers.append((f"ours+SR[{be}]", ours_sr))
        providers.append(("roof", roof))

        times = {}
        for prov, fn in providers:
            times[prov] = common.measure(fn, device, warmup=1 if args.quick else 2, rep=rep)
        roof_gbs = nbytes / times["roof"][0] / 1e6
        for prov, fn in providers:
            t = times[prov]
            gbs = nbytes / t[0] / 1e6
            report.add(
                case,
                prov,
                t,
                **{
                    "Gel/s": numel / t[0] / 1e6,
                    "GB/s": gbs,
                    "of roof": gbs / roof_gbs,
                    "speedup vs mezo": times["mezo"][0] / t[0],
                    "extra peak MB": common.extra_peak_bytes(fn, device, setup=fresh_params) / 2**20,
                },
            )
        if dtype != torch.float32:
            bench_write_back(report, params, device, backends, rseed, args.quick, rep)
        params = None  # free this case before the next
    report.finish(args.json)


def bench_write_back(report, params, device, backends, seed, quick, rep) -> None:
    """stochastic_round_ of float32 images into the 16-bit list, next to copy_ (round to nearest)."""
    images = [t.float() for t in params]
    numel = sum(t.numel() for t in params)
    nbytes = sum(t.numel() * (4 + t.element_size()) for t in params)
    name = {torch.bfloat16: "bf16", torch.float16: "fp16"}[params[0].dtype]
    case = f"write-back fp32 -> {name} {len(params)} tensors {numel / 1e6:.1f}M el"

    def copy():
        for t, x in zip(params, images):
            t.copy_(x)

    providers = []
    for be in backends:

        def ours(be=be):
            with lk.use_backend(be):
                lk.stochastic_round_(params, images, seed)

        with lk.use_backend(be):
            if _registry.active("stochastic_round_", torch.device(device).type) != be:
                print(f"skip round[{be}]: not available on {device}")
                continue
        providers.append((f"round[{be}]", ours))
    providers.append(("copy (roof)", copy))
    times = {prov: common.measure(fn, device, warmup=1 if quick else 2, rep=rep) for prov, fn in providers}
    roof_gbs = nbytes / times["copy (roof)"][0] / 1e6
    for prov, fn in providers:
        t = times[prov]
        gbs = nbytes / t[0] / 1e6
        report.add(
            case,
            prov,
            t,
            **{
                "Gel/s": numel / t[0] / 1e6,
                "GB/s": gbs,
                "of roof": gbs / roof_gbs,
                "extra peak MB": common.extra_peak_bytes(fn, device) / 2**20,
            },
        )


if __name__ == "__main__":
    main()
