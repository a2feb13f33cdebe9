"""Hugging Face users: ModelOutput closures, target modules, the three ways to give the Trainer an
optimizer, LoRA adapters with zeroth-order optimizers (peft). Each part skips without its package."""

from __future__ import annotations

import importlib.util
import io

import pytest
import torch

import lorenza.optim as lo


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_transformers = pytest.mark.skipif(not has("transformers"), reason="needs transformers")


def _llama(layers: int = 2, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def _batch(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(seed))


@needs_transformers
@pytest.mark.parametrize("name", ["MeZO", "AdaZoSAM", "Lorenza", "Loren"])
def test_model_output_closure_in_a_plain_loop(name):
    # The line a Hugging Face user writes first: the model's output (with .loss) is the loss.
    model = _llama()
    b = _batch()
    before = [p.detach().clone() for p in model.parameters()]
    kw = {"target_modules": "all-linear", "rank": 4} if name == "Lorenza" else {}
    opt = lo.make_optimizer(name, model, lr=1e-3, **kw)
    for _ in range(3):
        loss = opt.step(lo.make_closure(lambda: model(input_ids=b, labels=b)))
        assert loss.ndim == 0 and torch.isfinite(loss)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


@needs_transformers
def test_target_modules_like_the_trainer():
    model = _llama()
    names = {id(p): n for n, p in model.named_parameters()}
    picked = lambda tm: sorted(names[id(p)] for p in lo.target_parameters(model, tm))  # noqa: E731
    assert all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in picked(["q_proj", "v_proj"]))
    assert len(picked(["q_proj", "v_proj"])) == 4
    assert picked(r".*\.mlp\..*") == picked(["gate_proj", "up_proj", "down_proj"])  # a regex, fully matched
    every = picked("all-linear")  # the 7 linear layers of each block, not the embeddings or the head
    assert len(every) == 14 and not any("embed" in n or "lm_head" in n for n in every)
    groups = lo.param_groups(model, ["q_proj"], rank=4, update_proj_gap=7, rest={"weight_decay": 0.0})
    assert groups[0]["rank"] == 4 and groups[1]["rank"] is None and groups[1]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len({id(p) for p in model.parameters()})
    with pytest.raises(ValueError, match="target_modules"):
        lo.target_parameters(model, ["no_such_module"])
    with pytest.raises(ValueError, match="target_modules"):
        lo.make_optimizer("MeZO", model, target_modules="all-linear", lr=1e-3)
    with pytest.raises(ValueError, match="optimizer"):
        lo.make_optimizer("Adamax", model, lr=1e-3)


@pytest.mark.skipif(not (has("transformers") and has("accelerate")), reason="needs transformers and accelerate")
def test_the_three_ways_to_give_the_trainer_an_optimizer(tmp_path):
    from transformers import TrainingArguments

    from lorenza.integrations import LorenzaTrainer

    data = [{"input_ids": _batch(i)[0], "labels": _batch(i)[0]} for i in range(8)]
    opts = dict(rank=4, update_proj_gap=3, seed=3)
    finals = {}
    for way in ("optimizers", "optimizer_cls_and_kwargs", "by name"):
        model = _llama(seed=5)
        args = TrainingArguments(
            output_dir=str(tmp_path / way), max_steps=3, per_device_train_batch_size=4, report_to="none",
            save_strategy="no", use_cpu=True, disable_tqdm=True, max_grad_norm=0.0, learning_rate=1e-3,
            weight_decay=0.0, optim_target_modules=["q_proj", "v_proj"], lr_scheduler_type="constant",
        )  # fmt: skip
        kw = dict(target_modules=["q_proj", "v_proj"], lr=1e-3, weight_decay=0.0, **opts)
        if way == "optimizers":
            extra = {"optimizers": (lo.make_optimizer("lorenza", model, **kw), None)}
        elif way == "optimizer_cls_and_kwargs":
            extra = {"optimizer_cls_and_kwargs": lo.trainer_optimizer("lorenza", model, **kw)}
        else:
            extra = {"optimizer": "lorenza", "optimizer_kwargs": opts}
        trainer = LorenzaTrainer(model=model, args=args, train_dataset=data, **extra)
        trainer.train()
        inner = trainer._closure_optimizer()
        assert isinstance(inner, lo.Lorenza) and inner.param_groups[0]["rank"] == 4
        assert len(inner.param_groups[0]["params"]) == 4 and inner.param_groups[1]["rank"] is None
        finals[way] = [p.detach().clone() for p in model.parameters()]
    for way in ("optimizer_cls_and_kwargs", "by name"):
        assert all(torch.equal(a, b) for a, b in zip(finals["optimizers"], finals[way])), way


@pytest.mark.skipif(not (has("transformers") and has("peft")), reason="needs transformers and peft")
@pytest.mark.parametrize("name", ["MeZO", "MeZOAdam", "Loren", "AdaZoSAM"])
def test_lora_adapters(name, tmp_path):
    # MeZO (LoRA) of the MeZO paper: the base weights are frozen, LoRA's B starts at zero, only the
    # adapters move; the adapters and the optimizer state saved and loaded continue identically.
    from peft import LoraConfig, PeftModel, get_peft_model

    def fresh():
        return get_peft_model(_llama(seed=2), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    def trainable(model):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    b = _batch(3)
    model = fresh()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    adapters = trainable(model)
    assert adapters and all("lora_" in n for n in adapters)
    assert all(torch.count_nonzero(p) == 0 for n, p in adapters.items() if "lora_B" in n)
    start = {n: p.detach().clone() for n, p in adapters.items()}
    opt = lo.make_optimizer(name, model, lr=1e-2, seed=9)
    step = lambda m, o: o.step(lo.make_closure(lambda: m(input_ids=b, labels=b)))  # noqa: E731
    for _ in range(3):
        step(model, opt)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)
    assert any(not torch.equal(p, start[n]) for n, p in trainable(model).items())
    # save the adapters and the optimizer, reload into a fresh model, continue: identical runs
    model.save_pretrained(tmp_path / "adapters")
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    restored = PeftModel.from_pretrained(_llama(seed=2), tmp_path / "adapters", is_trainable=True)
    opt2 = lo.make_optimizer(name, restored, lr=1e-2, seed=9)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(2):
        step(model, opt)
        step(restored, opt2)
    for (n, p), (n2, p2) in zip(trainable(model).items(), trainable(restored).items()):
        assert n == n2 and torch.equal(p, p2), n
