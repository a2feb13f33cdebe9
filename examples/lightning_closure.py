"""UNTESTED EXAMPLE (lightning is not installed where this project is tested): a lorenza optimizer
inside PyTorch Lightning.

Lightning's automatic optimization calls ``optimizer.step(closure)`` itself, but its closure
also runs ``training_step``'s bookkeeping once per call and its gradient clipping and accumulation
assume one backward per step. Manual optimization is the documented way to own the step
(https://lightning.ai/docs/pytorch/stable/model/manual_optimization.html): here the closure
evaluates the loss of the current batch and, when gradients are enabled, calls
``self.manual_backward``.

    pip install lightning
    python examples/lightning_closure.py
"""

from __future__ import annotations

import lightning as L
import torch

from lorenza.demo import optimizers
from lorenza.demo.model import LlamaLM, lm_loss, parse_size


class ClosureLM(L.LightningModule):
    def __init__(self, optimizer: str = "AdaZoSAM", steps: int = 100):
        super().__init__()
        self.automatic_optimization = False
        self.model = LlamaLM(parse_size("tiny"))
        self.optimizer_name, self.steps = optimizer, steps

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad(set_to_none=True)

        def closure():
            loss = lm_loss(self.model, batch)
            if torch.is_grad_enabled():
                self.manual_backward(loss)
            return loss.detach()

        loss = opt.step(closure=closure)
        self.log("train_loss", loss if isinstance(loss, torch.Tensor) else float("nan"), prog_bar=True)

    def configure_optimizers(self):
        return optimizers.build(self.optimizer_name, self.model, optimizers.Hyper(steps=self.steps))


if __name__ == "__main__":
    text = torch.tensor(list(b"def f(x):\n    return x + 1\n" * 64), dtype=torch.int64)
    windows = [text[s : s + 65] for s in range(0, text.numel() - 65, 7)]
    loader = torch.utils.data.DataLoader(windows, batch_size=8, shuffle=True)
    L.Trainer(max_steps=100, accelerator="cpu", logger=False, enable_checkpointing=False).fit(ClosureLM(), loader)
