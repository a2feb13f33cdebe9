"""Fine-tuning with a lorenza optimizer in a plain PyTorch loop: the closure protocol, nothing else.

Every lorenza optimizer takes ``step(closure)``; the closure evaluates the loss of the current
minibatch (and calls backward when gradients are enabled). Zeroth-order and SAM-like optimizers
call it several times per step, on the same minibatch. ``lorenza.integrations.closure_step``
zeroes the gradients, builds the closure and steps; ``lorenza.optim.make_closure`` builds the
closure alone.

    python examples/plain_loop.py [--optimizer AdaZoSAM] [--steps 50]

Uses the demo's registry, so any optimizer of ``python -m lorenza.demo`` works here (AdamW
whatever else is installed).
"""

from __future__ import annotations

import argparse

import torch

from lorenza.demo import optimizers
from lorenza.demo.model import LlamaLM, lm_loss, parse_size
from lorenza.integrations import PassCounter, closure_step


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", default="AdamW", choices=optimizers.NAMES)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args(argv)

    torch.manual_seed(0)
    model = LlamaLM(parse_size("tiny"))
    # A toy task: continue a repeating byte pattern (learnable in a few steps).
    text = torch.tensor(list(b"def f(x):\n    return x + 1\n" * 64), dtype=torch.int64)
    optimizer = optimizers.build(args.optimizer, model, optimizers.Hyper(steps=args.steps))
    counter = PassCounter()
    for step in range(args.steps):
        starts = torch.randint(0, text.numel() - 65, (8,))
        batch = torch.stack([text[s : s + 65] for s in starts.tolist()])
        loss = closure_step(optimizer, lambda batch=batch: lm_loss(model, batch), counter=counter)
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {loss.item():.4f}")
    print(f"{args.optimizer}: {counter.forward} forward and {counter.backward} backward passes in {args.steps} steps")
    return loss.item()


if __name__ == "__main__":
    main()
