"""A Hugging Face ``Trainer`` whose every optimizer step is ``optimizer.step(closure)``.

``transformers.Trainer`` computes the loss and calls backward in ``training_step``, then calls
``optimizer.step()`` without a closure, which zeroth-order optimizers (MeZO, LOREN) and
sharpness-aware ones (SAM, AdaZo-SAM, LORENZA) cannot work with: they must evaluate the loss
several times, at perturbed parameters, on the same minibatch. :class:`LorenzaTrainer` moves the
step into ``training_step``, where the minibatch is at hand: it builds a closure around
``compute_loss`` (backward through ``accelerator.backward``, gradient clipping to
``max_grad_norm`` right after each backward pass, i.e. before the optimizer uses the gradient),
runs ``optimizer.step(closure)``, and turns the Trainer's own later ``optimizer.step()`` into a
no-op (:class:`ClosureOnlyStep`). The learning-rate scheduler, logging, evaluation, checkpoints
(``optimizer.state_dict``) work as usual. Any ``torch.optim.Optimizer`` works (AdamW calls the
closure once). MeZO's trainer does the same by rewriting the whole training loop
(https://github.com/princeton-nlp/MeZO/blob/main/large_models/trainer.py); overriding
``training_step`` keeps the rest of ``Trainer`` intact.

    trainer = LorenzaTrainer(model=model, args=TrainingArguments(..., max_grad_norm=0.0),
                             train_dataset=ds, optimizers=(lorenza.optim.AdaZoSAM(model.parameters(), lr=1e-4), None))
    trainer.train()

The optimizer can be given in the three ways of the Trainer (``lorenza/optim/groups.py``):
``optimizers=(opt, None)`` with ``lorenza.optim.make_optimizer(...)``;
``optimizer_cls_and_kwargs=lorenza.optim.trainer_optimizer(...)``; or by name,
``LorenzaTrainer(..., optimizer="lorenza", optimizer_kwargs={"rank": 64})``, which builds it with
``args.learning_rate``, ``args.weight_decay`` and, for the low-rank optimizers, the target modules
of ``args.optim_target_modules`` (names, regexes or "all-linear"; default "all-linear") unless
``optimizer_kwargs`` names ``target_modules``.

With ``same_randomness=True`` (default) every closure call of one step sees the same random
numbers (dropout masks), so that zeroth-order differences measure the parameters, not dropout.
Not supported: gradient accumulation (each closure must see the whole minibatch), fp16 with a
gradient scaler, DeepSpeed (bf16 and plain DDP are fine). The logged ``grad_norm`` is the norm before
clipping of the gradient the step used (its last backward pass); zeroth-order optimizers log none.
"""

from __future__ import annotations

import inspect

import torch

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(f"lorenza.integrations.hf needs the optional package transformers: {e}") from e

from .loop import PassCounter, StepClosure

__all__ = ["ClosureOnlyStep", "LorenzaTrainer"]


class ClosureOnlyStep(torch.optim.Optimizer):
    """Wraps an optimizer: ``step(closure)`` steps it, ``step()`` without a closure does nothing.

    Everything else (``param_groups``, ``state``, ``state_dict``, ``zero_grad``, hooks) is the
    wrapped optimizer's, so schedulers and checkpoints see the real optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):  # no super().__init__: nothing of its own
        self.optimizer = optimizer

    def __getattr__(self, name: str):
        if name == "optimizer":
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    param_groups = property(
        lambda self: self.optimizer.param_groups, lambda self, v: setattr(self.optimizer, "param_groups", v)
    )
    state = property(lambda self: self.optimizer.state, lambda self, v: setattr(self.optimizer, "state", v))
    defaults = property(lambda self: self.optimizer.defaults, lambda self, v: setattr(self.optimizer, "defaults", v))

    def step(self, closure=None):
        return None if closure is None else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return f"ClosureOnlyStep({self.optimizer!r})"


class LorenzaTrainer(Trainer):
    """``transformers.Trainer`` driving ``optimizer.step(closure)``; see the module docstring.

    ``pass_counter`` counts the forward and backward passes of training so far.
    """

    def __init__(
        self,
        *args,
        same_randomness: bool = True,
        optimizer: str | type | None = None,
        optimizer_kwargs: dict | None = None,
        **kwargs,
    ):
        if optimizer is not None and (kwargs.get("optimizers", (None, None))[0] is not None
                                      or kwargs.get("optimizer_cls_and_kwargs") is not None):  # fmt: skip
            raise ValueError("optimizer: give the optimizer one way only (optimizer=, optimizers= or "
                             "optimizer_cls_and_kwargs=)")  # fmt: skip
        self._optimizer_spec = (optimizer, dict(optimizer_kwargs or {}))
        super().__init__(*args, **kwargs)
        a = self.args
        if a.gradient_accumulation_steps != 1:
            raise ValueError(
                "LorenzaTrainer: gradient_accumulation_steps must be 1 (every closure call must see "
                "the whole minibatch); raise per_device_train_batch_size instead"
            )
        if a.fp16:
            raise ValueError(
                "LorenzaTrainer: fp16 needs a gradient scaler, which closure steps do not support; use bf16"
            )
        if getattr(a, "deepspeed", None):
            raise ValueError("LorenzaTrainer: DeepSpeed runs its own optimizer step; not supported")
        self.same_randomness = same_randomness
        self.pass_counter = PassCounter()
        self._loss_takes_items = "num_items_in_batch" in inspect.signature(self.compute_loss).parameters

    def create_optimizer(self, model=None):
        name, options = self._optimizer_spec
        if self.optimizer is None and name is not None:
            from lorenza.optim import groups

            opt_model = model if model is not None else self.model
            options = {"lr": self.args.learning_rate, "weight_decay": self.args.weight_decay, **options}
            if issubclass(groups._resolve(name), groups.LOW_RANK):
                options.setdefault("target_modules", self.args.optim_target_modules or "all-linear")
            self.optimizer = groups.make_optimizer(name, opt_model, **options)
        super().create_optimizer(model) if model is not None else super().create_optimizer()
        if not isinstance(self.optimizer, ClosureOnlyStep):
            self.optimizer = ClosureOnlyStep(self.optimizer)
        return self.optimizer

    def _closure_optimizer(self) -> torch.optim.Optimizer:
        opt = self.optimizer
        while not isinstance(opt, ClosureOnlyStep):  # accelerate's AcceleratedOptimizer wraps ours
            inner = getattr(opt, "optimizer", None)
            if inner is None:
                raise RuntimeError("LorenzaTrainer: the optimizer was not created through create_optimizer")
            opt = inner
        return opt.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        inputs = self._prepare_inputs(inputs)
        kwargs = {"num_items_in_batch": num_items_in_batch} if self._loss_takes_items else {}

        def loss_fn() -> torch.Tensor:
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs, **kwargs)
            return loss.mean() if self.args.n_gpu > 1 else loss

        params = [p for p in model.parameters() if p.requires_grad]
        closure = StepClosure(
            loss_fn,
            counter=self.pass_counter,
            backward=self.accelerator.backward,
            clip_grad_norm=self.args.max_grad_norm or None,
            clip_params=params,
            same_randomness=self.same_randomness,
            track_grad_norm=True,
        )
        optimizer = self._closure_optimizer()
        optimizer.zero_grad(set_to_none=True)
        self._step_grad_norm = None
        out = optimizer.step(closure)
        self._step_grad_norm = closure.grad_norm
        loss = out if isinstance(out, torch.Tensor) else closure.last_loss
        if loss is None:
            raise RuntimeError(f"{type(optimizer).__name__}.step(closure) never called the closure")
        return loss.detach().to(self.args.device)

    # The Trainer logs the norm it gets from these two after training_step, when our step has
    # already clipped (and possibly freed) the gradients: hand it the norm the closure measured
    # before clipping, in the step's last backward pass (the gradient the update used), or None for
    # an optimizer that took no gradient (zeroth-order: no "grad_norm" is logged).
    def _clip_grad_norm(self, model):
        return getattr(self, "_step_grad_norm", None)

    def _get_grad_norm(self, model, grad_norm=None):
        return getattr(self, "_step_grad_norm", None)
