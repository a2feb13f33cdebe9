"""Parameter groups from a model, the way Hugging Face users describe them, and optimizer factories.

``transformers.Trainer`` selects the matrices of a low-rank optimizer with ``optim_target_modules``
(module names, regular expressions, or ``"all-linear"``) and builds the optimizer from
``optimizers=(optimizer, scheduler)`` or ``optimizer_cls_and_kwargs=(cls, kwargs)``. The same three
ways work here:

    import lorenza.optim as lo

    # 1. an optimizer object
    opt = lo.make_optimizer("lorenza", model, target_modules=["q_proj", "v_proj"], rank=64, lr=1e-4)
    trainer = LorenzaTrainer(model=model, args=args, optimizers=(opt, None), ...)

    # 2. (class, kwargs), built by the Trainer
    trainer = LorenzaTrainer(model=model, args=args, ...,
                             optimizer_cls_and_kwargs=lo.trainer_optimizer("lorenza", model,
                                                                           target_modules="all-linear", rank=64))

    # 3. by name, targets from TrainingArguments(optim_target_modules=...)
    trainer = LorenzaTrainer(model=model, args=args, ..., optimizer="lorenza", optimizer_kwargs={"rank": 64})

and in a plain loop ``Lorenza(lo.param_groups(model, "all-linear", rank=64), lr=1e-4)``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .adazo_sam import AdaZoSAM
from .galore import GaLoreAdamW
from .loren import Loren
from .lorenza import Lorenza, LorenzaPlus
from .mezo import MeZO, MeZOAdam
from .sam import SAM

__all__ = ["OPTIMIZERS", "make_optimizer", "param_groups", "target_parameters", "trainer_optimizer"]

#: Names accepted by the factories (case-insensitive, "-" and "_" ignored), and the classes.
OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adazosam": AdaZoSAM,
    "lorenza": Lorenza,
    "lorenzaplus": LorenzaPlus,
    "loren": Loren,
    "mezo": MeZO,
    "mezoadam": MeZOAdam,
    "galoreadamw": GaLoreAdamW,
    "galore": GaLoreAdamW,
    "sam": SAM,
}
LOW_RANK = (Lorenza, GaLoreAdamW)  # LorenzaPlus is a Lorenza
#: Options of the low-rank group (galore-torch's names included); the others go to the constructor.
GROUP_KEYS = ("rank", "update_interval", "update_proj_gap", "scale", "proj_type", "residual_scale")


def _linear_like(module: nn.Module) -> bool:
    """``nn.Linear``, or a module with a 2-D ``weight`` of that role (GPT-2's ``Conv1D``)."""
    if isinstance(module, nn.Linear):
        return True
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2


def _matches(name: str, target_modules: str | Sequence[str]) -> bool:
    """The Trainer's rule: a string is a regular expression matched against the whole name; a list
    matches a name equal to an entry, containing it, or fully matched by it as a regex."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(t == name or t in name or re.fullmatch(t, name) is not None for t in target_modules)


def target_parameters(model: nn.Module, target_modules: str | Sequence[str]) -> list[nn.Parameter]:
    """The trainable weights of the linear modules that ``target_modules`` selects.

    ``"all-linear"``: every linear module except the input and output embeddings (the LM head),
    as PEFT and the Trainer read it. Otherwise the Trainer's rule (:func:`_matches`) on the names
    of the linear modules (a matching module that is not linear, such as a whole attention block
    or an activation, is passed over, as the Trainer does: its linear children match by name).
    Selecting nothing is an error.
    """
    if isinstance(target_modules, (list, tuple)) and not target_modules:
        raise ValueError("target_modules: empty")
    if not isinstance(target_modules, (str, list, tuple)) or not all(
        isinstance(t, str) for t in ([target_modules] if isinstance(target_modules, str) else target_modules)
    ):
        raise TypeError(f"target_modules: expected a string or a list of strings, got {target_modules!r}")
    skip: set[int] = set()
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, accessor, lambda: None)()
        if module is not None:
            skip |= {id(p) for p in module.parameters()}
    out, seen = [], set()
    for name, module in model.named_modules():
        if not name:
            continue
        if not _linear_like(module):
            continue
        if target_modules == "all-linear":
            chosen = id(getattr(module, "weight", None)) not in skip
        else:
            chosen = _matches(name, target_modules)
        w = getattr(module, "weight", None) if chosen else None
        if isinstance(w, nn.Parameter) and w.requires_grad and id(w) not in seen:
            seen.add(id(w))
            out.append(w)
    if not out:
        raise ValueError(f"target_modules: {target_modules!r} selects no trainable linear weight of the model")
    return out


def param_groups(
    model: nn.Module,
    target_modules: str | Sequence[str] = "all-linear",
    rank: int = 128,
    *,
    rest: dict[str, Any] | None = None,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """Two parameter groups for a low-rank optimizer (Lorenza, LorenzaPlus, GaLoreAdamW).

    ``[{"params": targets, "rank": rank, **group_options}, {"params": others, "rank": None, **rest}]``:
    the weights of the target modules (:func:`target_parameters`) get the subspace, every other
    trainable parameter (embeddings, head, norms, biases, other matrices) is dense, and so is a
    target too small for the rank (``rank >= min(m, n)``: its subspace would be the whole matrix).
    Frozen parameters are left out; a parameter shared by several modules appears once.
    """
    targets = [
        p for p in target_parameters(model, target_modules)
        if rank is None or rank < min(p.shape[0], p.numel() // max(1, p.shape[0]))
    ]  # fmt: skip
    ids = {id(p) for p in targets}
    others, seen = [], set(ids)
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            others.append(p)
    groups = [{"params": targets, "rank": rank, **group_options}] if targets else []
    if others:
        groups.append({"params": others, "rank": None, **(rest or {})})
    return groups


def _resolve(optimizer: str | type) -> type:
    if isinstance(optimizer, type):
        return optimizer
    key = str(optimizer).lower().replace("-", "").replace("_", "")
    if key not in OPTIMIZERS:
        raise ValueError(f"optimizer: unknown {optimizer!r}; known: {', '.join(sorted(OPTIMIZERS))}")
    return OPTIMIZERS[key]


def trainer_optimizer(
    optimizer: str | type,
    model: nn.Module,
    *,
    target_modules: str | Sequence[str] | None = None,
    **kwargs: Any,
) -> tuple[type, dict[str, Any]]:
    """``(cls, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``: ``kwargs["params"]`` holds the
    parameter groups (the Trainer uses them instead of its own). For the low-rank optimizers the
    group options (``rank``, ``update_interval`` or ``update_proj_gap``, ``scale``, ``proj_type``,
    ``residual_scale``) go to the target group, the rest to the constructor; ``target_modules``
    defaults to ``"all-linear"``. The other optimizers take every trainable parameter and no
    ``target_modules``."""
    cls = _resolve(optimizer)
    kwargs = dict(kwargs)
    if issubclass(cls, LOW_RANK):
        group = {k: kwargs.pop(k) for k in GROUP_KEYS if k in kwargs}
        if "update_proj_gap" in group and not issubclass(cls, GaLoreAdamW):
            if "update_interval" in group:
                raise ValueError("update_proj_gap: an alias of update_interval; give one of them")
            group["update_interval"] = group.pop("update_proj_gap")  # galore-torch's name
        params: Any = param_groups(model, target_modules or "all-linear", **group)
    else:
        if target_modules is not None:
            raise ValueError(f"target_modules: {cls.__name__} has no low-rank groups; leave it out")
        params = [p for p in model.parameters() if p.requires_grad]
    if cls is SAM:
        kwargs.setdefault("base_optimizer", torch.optim.AdamW)
    return cls, {"params": params, **kwargs}


def make_optimizer(
    optimizer: str | type, model: nn.Module, *, target_modules: str | Sequence[str] | None = None, **kwargs: Any
) -> torch.optim.Optimizer:
    """The optimizer itself (``Trainer(optimizers=(opt, None))`` or a plain loop); see
    :func:`trainer_optimizer` for the arguments."""
    cls, kw = trainer_optimizer(optimizer, model, target_modules=target_modules, **kwargs)
    return cls(kw.pop("params"), **kw)
