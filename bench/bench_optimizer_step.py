"""One optimizer step, and its memory, of every optimizer on Llama-style models of growing size.

For each model size (the demo's Llama-style model, byte vocabulary) and each optimizer of the
demo's registry (``lorenza.demo.optimizers``), after two warm-up steps (the state exists; the second counts the passes):

  median/p20/p80 ms   one full step: ``optimizer.step(closure)`` with every forward/backward pass
                      the optimizer asks for, on one fixed minibatch (bench/common.py ``measure``)
  fwd, bwd            forward and backward passes of one step, counted at the closure
  params MB           parameters;  state MB: every tensor in ``optimizer.state`` (+ SAM's base)
  step peak MB        memory a step allocates beyond what is live before it (gradients,
                      activations, temporaries). GPU: bench/common.py ``extra_peak_bytes`` (CUDA
                      allocator statistics). CPU: the storage tracker of lorenza/demo/memory.py
                      (live bytes of the tensors the step's operators create), because the
                      profiler that common.py uses on the CPU takes minutes on a step of thousands
                      of small operators (zeroth-order probes through the pure-PyTorch kernels)
  total MB            params + state + step peak: the peak a training loop needs for this step
  ms/Mparam           step time per million parameters, to read how time grows with size

  python bench/bench_optimizer_step.py [--quick] [--device cpu|cuda] [--json out.json]
         [--optimizers AdamW,MeZO] [--sizes dim=256,layers=4,heads=4;...] [--dtype fp32|bf16]
"""

from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common

try:
    import lorenza.demo  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python_api"))

from lorenza.demo import optimizers
from lorenza.demo.memory import PeakMemory, module_bytes, optimizer_state_bytes
from lorenza.demo.model import LlamaLM, lm_loss, parse_size
from lorenza.integrations.loop import PassCounter, closure_step

# (model size spec, batch, sequence length) per device. GPU: up to about 1B parameters.
SIZES = {
    ("cpu", True): [
        ("dim=64,layers=2,heads=4", 4, 64),
        ("dim=128,layers=4,heads=4", 4, 64),
        ("dim=256,layers=4,heads=4", 4, 64),
    ],
    ("cpu", False): [
        ("dim=128,layers=4,heads=4", 8, 128),
        ("dim=256,layers=6,heads=8", 8, 128),
        ("dim=512,layers=8,heads=8", 8, 128),
        ("dim=768,layers=8,heads=12", 4, 128),
    ],
    ("cuda", True): [("dim=512,layers=8,heads=8", 8, 256), ("dim=1024,layers=12,heads=16", 8, 256)],
    ("cuda", False): [
        ("dim=768,layers=12,heads=12", 8, 512),
        ("dim=1024,layers=24,heads=16", 8, 512),
        ("dim=2048,layers=18,heads=16", 8, 512),
    ],
}


def extra_peak_bytes(fn, device: torch.device, setup) -> int:
    """Peak bytes ``fn`` allocates beyond what is live after ``setup`` (see the module docstring)."""
    if device.type == "cuda":
        return common.extra_peak_bytes(fn, device, setup=setup)
    setup()
    with PeakMemory(device) as pm:
        fn()
    return pm.peak_bytes


def main() -> None:
    p = common.parser(__doc__.splitlines()[0])
    p.add_argument("--optimizers", default="all")
    p.add_argument("--sizes", default=None, help="';'-separated model specs (batch 8, seq 128 unless seq= given)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.sizes:
        sizes = [(s, 8, parse_size(s).max_seq_len if "seq=" in s else 128) for s in args.sizes.split(";")]
    else:
        sizes = SIZES[(device.type, args.quick)]
    names = optimizers.resolve(args.optimizers)
    report = common.Report("optimizer_step", device)
    warmup, rep = (0, 3) if args.quick else (1, 5)  # after the two steps below

    for spec, batch_size, seq in sizes:
        cfg = parse_size(f"{spec},seq={seq}")
        torch.manual_seed(0)
        base = LlamaLM(cfg).to(device=device, dtype=dtype)
        state0 = {k: v.clone() for k, v in base.state_dict().items()}
        batch = torch.randint(0, cfg.vocab_size, (batch_size, seq + 1), device=device)
        case = f"{cfg.num_params() / 1e6:.1f}M d{cfg.dim} L{cfg.n_layers} {batch_size}x{seq}"
        for name in names:
            base.load_state_dict(state0)
            for p_ in base.parameters():
                p_.grad = None
            opt = optimizers.build(name, base, optimizers.Hyper(steps=1000))
            counter = PassCounter()

            def step(opt=opt, counter=counter, model=base, batch=batch):
                closure_step(opt, lambda: lm_loss(model, batch), counter=counter)

            def drop_grads(model=base):
                for p_ in model.parameters():
                    p_.grad = None

            try:
                step()  # the state exists from here on
                counter.forward = counter.backward = 0
                step()
                fwd, bwd = counter.forward, counter.backward
                times = common.measure(step, device, warmup=warmup, rep=rep)
                drop_grads()
                extra = extra_peak_bytes(step, device, setup=drop_grads)
            except Exception as e:  # noqa: BLE001 - one failing optimizer must not end the sweep
                print(f"failed {name} on {case}: {type(e).__name__}: {e}")
                continue
            params_mb = module_bytes(base) / 2**20
            state_mb = optimizer_state_bytes(opt) / 2**20
            report.add(
                case,
                name,
                times,
                fwd=fwd,
                bwd=bwd,
                **{
                    "params MB": params_mb,
                    "state MB": state_mb,
                    "step peak MB": extra / 2**20,
                    "total MB": params_mb + state_mb + extra / 2**20,
                    "ms/Mparam": times[0] / (cfg.num_params() / 1e6),
                },
            )
            del opt
            drop_grads()
        del base, state0
        if device.type == "cuda":
            torch.cuda.empty_cache()
    report.finish(args.json)


if __name__ == "__main__":
    main()
