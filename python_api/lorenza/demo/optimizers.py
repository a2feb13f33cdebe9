"""The one registry of the optimizers the demo and the benchmarks compare.

``build(name, model, hp)`` returns a ``torch.optim.Optimizer`` for the model's trainable
parameters, with learning rates chosen for a short fine-tune of an already pre-trained model:
``torch.optim.AdamW`` for "AdamW", the class of that name from :mod:`lorenza.optim` otherwise. An
optimizer that cannot be built or fails is a bug, and the error propagates.

Low-rank optimizers (GaLore-AdamW, LORENZA, Lorenza+) get two parameter groups: the matrices of the
transformer blocks with ``rank`` (and ``update_interval``, ``scale``), and everything else (norms,
embeddings, output head: GaLore's practice, https://github.com/jiaweizzhao/GaLore) without ``rank``.

Learning rates: peak values under the demo's schedule (10% warm-up, cosine decay), for a short
fine-tune of a small pre-trained model, from a coarse sweep (the tiny model, 60 steps, the
lorenza.optim classes): AdamW-like 1e-3 and 2e-3 both improve, 2e-3 more; GaLore-like 4x that,
because GaLore's scale 0.25 shrinks the projected update (not swept: not written yet); MeZO and
MeZO-Adam improve up to 5e-4 and get worse at 1e-3, LOREN up to 3e-4 and gets worse at 1e-3 (the
zeroth-order estimate's variance grows with the number of parameters), so those take a margin
below the best. Larger models want smaller rates: ``--lr NAME=VALUE``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from lorenza import optim


@dataclass
class Hyper:
    """Knobs shared by every factory; ``lr`` overrides the registry's default per name."""

    steps: int = 100
    rank: int = 0  # 0: a quarter of the model width (at least 4)
    update_interval: int = 0  # 0: a fifth of the steps, between 5 and 200
    rho: float = 0.05
    mu: float = 1e-3
    seed: int = 0
    weight_decay: float = 0.0  # 0 for all: compare optimizers, not regularisers
    lr: dict[str, float] = field(default_factory=dict)
    #: extra constructor keywords of the optimizers that take them (e.g. {"probe": "inplace"})
    options: dict = field(default_factory=dict)

    def interval(self) -> int:
        return self.update_interval or max(5, min(200, self.steps // 5))


@dataclass(frozen=True)
class Spec:
    name: str
    cls: str  # attribute of lorenza.optim (AdamW: torch.optim's)
    lr: float
    passes: tuple[int, int]  # nominal (forward, backward) passes per step: the table of docs/algorithms.md
    lowrank: bool = False
    kwargs: Callable[[Hyper], dict] = lambda hp: {}
    note: str = ""


def _adam(hp: Hyper) -> dict:
    return {"weight_decay": hp.weight_decay}


def _lowrank(hp: Hyper) -> dict:
    return {"update_interval": hp.interval(), "scale": 0.25}


SPECS: dict[str, Spec] = {
    s.name: s
    for s in [
        Spec("AdamW", "AdamW", 2e-3, (1, 1), kwargs=_adam, note="first order, two moments"),
        Spec(
            "SAM",
            "SAM",
            2e-3,
            (2, 2),
            kwargs=lambda hp: {"base_optimizer": torch.optim.AdamW, "rho": hp.rho, **_adam(hp)},
            note="SAM around AdamW: two forward/backward passes",
        ),
        Spec(
            "GaLoreAdamW",
            "GaLoreAdamW",
            8e-3,
            (1, 1),
            lowrank=True,
            kwargs=lambda hp: {**_lowrank(hp), **_adam(hp)},
            note="projected Adam, exact SVD",
        ),
        Spec(
            "AdaZoSAM",
            "AdaZoSAM",
            2e-3,
            (3, 1),
            kwargs=lambda hp: {"rho": hp.rho, "mu": hp.mu, "seed": hp.seed},
            note="Adam + zeroth-order SAM ascent (q=1)",
        ),
        Spec(
            "Lorenza",
            "Lorenza",
            8e-3,
            (3, 1),
            lowrank=True,
            kwargs=lambda hp: {"rho": hp.rho, "mu": hp.mu, "seed": hp.seed, **_lowrank(hp)},
            note="AdaZo-SAM in a randomized-SVD subspace",
        ),
        Spec(
            "LorenzaPlus",
            "LorenzaPlus",
            8e-3,
            (3, 1),
            lowrank=True,
            kwargs=lambda hp: {"rho": hp.rho, "mu": hp.mu, "seed": hp.seed, **_lowrank(hp)},
            note="Lorenza + the orthogonal residual",
        ),
        Spec(
            "MeZO",
            "MeZO",
            3e-4,
            (2, 0),
            kwargs=lambda hp: {"mu": hp.mu, "seed": hp.seed},
            note="ZO-SGD, two forward passes",
        ),
        Spec(
            "MeZOAdam",
            "MeZOAdam",
            3e-4,
            (2, 0),
            kwargs=lambda hp: {"mu": hp.mu, "seed": hp.seed},
            note="ZO estimate fed to Adam",
        ),
        Spec(
            "Loren",
            "Loren",
            2e-4,
            (10, 0),
            kwargs=lambda hp: {"mu": hp.mu, "num_queries": 10, "seed": hp.seed},
            note="ZO with learned low-rank covariance, K=10",
        ),
    ]
}
NAMES: list[str] = list(SPECS)


def resolve(names: str | list[str] | None) -> list[str]:
    """Registry names from a comma list (case-insensitive; ``all`` or None: every optimizer)."""
    if names is None or names == "all":
        return list(NAMES)
    items = names.split(",") if isinstance(names, str) else list(names)
    lower = {n.lower(): n for n in NAMES}
    out = []
    for item in (i.strip() for i in items if i.strip()):
        if item.lower() not in lower:
            raise ValueError(f"unknown optimizer {item!r}; known: {', '.join(NAMES)}")
        out.append(lower[item.lower()])
    return out


def optimizer_class(name: str) -> type:
    """The class behind a registry name."""
    spec = SPECS[name]
    return torch.optim.AdamW if spec.cls == "AdamW" else getattr(optim, spec.cls)


def lowrank_groups(model: nn.Module, rank: int, extra: dict) -> list[dict]:
    """Two groups: block matrices with min(shape) > rank get ``rank`` (+ ``extra``); the rest none.

    Embeddings and the output head stay dense (found through the Hugging Face accessors
    ``get_input_embeddings``/``get_output_embeddings`` when the model has them, else by name).
    """
    skip: set[int] = set()
    for accessor in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, accessor, lambda: None)()
        if module is not None:
            skip |= {id(p) for p in module.parameters()}
    matrices, rest, seen = [], [], set()
    for pname, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_embedding = id(p) in skip or any(k in pname for k in ("embed", "lm_head", "wte", "wpe"))
        (
            matrices if p.dim() >= 2 and min(p.shape[0], p.numel() // p.shape[0]) > rank and not is_embedding else rest
        ).append(p)
    groups = [{"params": matrices, "rank": rank, **extra}] if matrices else []
    return groups + ([{"params": rest}] if rest else [])


def default_rank(model: nn.Module) -> int:
    widths = [min(p.shape) for p in model.parameters() if p.dim() == 2]
    return max(4, (min(widths) if widths else 16) // 4)


def constructor_keywords(cls: type) -> set[str]:
    """The keyword names ``cls(...)`` accepts: its ``__init__``'s, and where that forwards ``**kwargs``
    to ``super().__init__`` (LorenzaPlus to Lorenza), those of the next ``__init__`` in the MRO.

    SAM's ``**base_kwargs`` go to its base optimizer, not up the MRO (to ``torch.optim.Optimizer``,
    which takes none of the options), so an option such as ``probe`` is not forwarded to AdamW.
    """
    names: set[str] = set()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters
        names |= {n for n, p in params.items() if p.kind in kinds and n != "self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break
    return names


def build(name: str, model: nn.Module, hp: Hyper | None = None) -> torch.optim.Optimizer:
    """The optimizer ``name`` for ``model``."""
    hp = hp or Hyper()
    spec = SPECS[resolve(name)[0]]
    cls = optimizer_class(spec.name)
    lr = hp.lr.get(spec.name, spec.lr)
    kwargs = spec.kwargs(hp)
    if spec.lowrank:
        extra = {k: kwargs.pop(k) for k in ("update_interval", "scale") if k in kwargs}
        params: list = lowrank_groups(model, hp.rank or default_rank(model), extra)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    if hp.options and cls.__module__.startswith("lorenza."):
        accepted = constructor_keywords(cls)
        kwargs.update({k: v for k, v in hp.options.items() if k in accepted})
    return cls(params, lr=lr, **kwargs)


def cost(name: str) -> int:
    """Forward-pass equivalents of one step (a backward pass counted as two forwards)."""
    f, b = SPECS[name].passes
    return f + 2 * b
