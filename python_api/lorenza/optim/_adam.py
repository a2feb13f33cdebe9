"""AdamW on a set of parameters with their per-group hyperparameters and per-parameter state.

The state layout of every dense Adam parameter of :mod:`lorenza.optim` (``step`` as a Python int,
``exp_avg``, ``exp_avg_sq`` in ``state_dtype``), and one multi-tensor update per parameter group.
``update`` is ``_functional.adamw_`` (``torch.optim.AdamW``'s arithmetic) or
``_functional.galore_adamw_`` (galore-torch's).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from . import _sharding
from ._functional import adamw_, init_adam_state
from ._noise import Slot, offsets_of

__all__ = ["adamw_slots_"]


def adamw_slots_(
    state: dict,
    slots: Sequence[Slot],
    grads: Sequence[torch.Tensor],
    state_dtype: torch.dtype | None,
    update: Callable = adamw_,
    rounding_seed: int | None = None,
) -> None:
    """One Adam step of every slot (state created on first use), one ``update`` call per group.
    With ``rounding_seed``, the groups that keep ``stochastic_rounding`` round their bfloat16/float16
    parameters stochastically (each from its own stream). Sharded (FSDP2) parameters: the state is
    created like the parameter (a DTensor with its placement, for checkpoints) and the update runs
    on the local shards, rounding with the words of the shard's global indices."""
    by_group: dict[int, list[int]] = {}
    for k, slot in enumerate(slots):
        by_group.setdefault(id(slot.group), []).append(k)
    for members in by_group.values():
        group = slots[members[0]].group
        params = [slots[k].param for k in members]
        states = [state[p] for p in params]
        for p, st in zip(params, states):
            if "step" not in st:
                init_adam_state(p, st, state_dtype)
            st["step"] += 1
        beta1, beta2 = group["betas"]
        rounds = rounding_seed is not None and bool(group.get("stochastic_rounding", True))
        loc = _sharding.local
        update(
            [slots[k].data for k in members], [loc(grads[k]) for k in members], [loc(st["exp_avg"]) for st in states],
            [loc(st["exp_avg_sq"]) for st in states], [st["step"] for st in states], lr=float(group["lr"]),
            beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
            rounding_seed=rounding_seed if rounds else None, streams=[slots[k].stream for k in members],
            offsets=offsets_of([slots[k] for k in members]),
        )  # fmt: skip
