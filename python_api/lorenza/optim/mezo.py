"""MeZO / ZO-SGD and MeZO-Adam (Malladi et al., 2023, https://arxiv.org/abs/2305.17333).

Reference implementation of the paper: https://github.com/princeton-nlp/MeZO (``trainer.py``:
``zo_perturb_parameters``, ``zo_step``, ``zo_update``), which regenerates ``z`` from
``torch.manual_seed`` per tensor and takes four passes per step. Here ``z`` comes from the
lorenza-philox-v1 stream through ``lorenza_kernels.seeded_axpby_`` and the restore and the update
are one pass (``docs/algorithms.md``, "MeZO"). Every pass is one multi-tensor call over all
parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _checks, _sharding
from ._adam import adamw_slots_
from ._base import SeededOptimizer
from ._functional import buckets
from ._noise import Slot, offsets_of, seeded_axpby_slots_
from ._seeds import probe_seed

__all__ = ["MeZO", "MeZOAdam"]


class _TwoSidedZO(SeededOptimizer):
    """Shared by MeZO and MeZO-Adam: the probes and the projected gradients ``g_j``."""

    global_checks = {"num_probes": 1}

    def _probe_step(self, closure: Callable[[], Any] | None):
        closure = self._require_closure(closure)
        ctx = self._context(self._global["step"] + 1)
        q = self._global["num_probes"]
        seeds = [probe_seed(self.seed, ctx.step, j) for j in range(q)]
        mus = [float(s.group["mu"]) for s in ctx.slots]
        losses, _, ok = self._two_sided_probes(ctx, closure, seeds, mus, need_norms=False)
        self._global["step"] = ctx.step
        # g[j][i]: the projected gradient of probe j, per slot (a group's mu scales its directions).
        g = [[(losses[2 * j] - losses[2 * j + 1]) / (2.0 * mu) for mu in mus] for j in range(q)]
        loss = torch.tensor(sum(losses) / len(losses))
        return ctx, seeds, mus, g, loss, ok


class MeZO(_TwoSidedZO):
    r"""MeZO (zeroth-order SGD with two-sided seeded probes), ``docs/algorithms.md`` "MeZO".

    Per step ``t`` and probe ``j < q`` (``q = num_probes``), with ``z_j`` drawn from
    ``(probe_seed(seed, t, j), stream of the parameter)``:

    .. math::
        g_j = \frac{L(\theta + \mu z_j) - L(\theta - \mu z_j)}{2\mu}, \qquad
        \theta \leftarrow (1 - \eta\lambda)\theta - \frac{\eta}{q}\sum_j g_j z_j .

    The restore of the last probe and its update are one ``seeded_axpby_`` pass:
    ``theta <- (1 - eta lambda)(theta + mu z) - eta g z``; the other probes' terms take one pass
    each. ``mu``, ``lr`` and ``weight_decay`` are per group (a group's ``mu`` scales its part of the
    direction and its ``g_j``). Memory: the parameters only; the state holds no tensor.

    The closure is called ``2 q`` times per step under ``torch.no_grad()``; under
    ``torch.distributed`` the ``2 q`` losses are averaged over the ranks in one all-reduce, so
    every rank takes the same step. A non-finite loss skips the step (perturbation removed, skip
    counted, one warning). ``step`` returns the mean of the probe losses.

    Default ``lr = 1e-6``: the MeZO paper's rate for full-parameter fine-tuning of language models
    (its grid for the OPT models was {1e-6, 1e-7}, with ``mu = 1e-3``). The step ``lr g z`` grows
    with the square root of the number of parameters (``||z||``), so the torch default of 1e-3
    would diverge on a real model; small models want more (``docs/algorithms.md``, "Defaults").
    """

    group_checks = {**SeededOptimizer.group_checks, "mu": _checks.positive}

    def __init__(
        self,
        params: Any,
        lr: float = 1e-6,
        *,
        mu: float = 1e-3,
        weight_decay: float = 0.0,
        num_probes: int = 1,
        seed: int = 0,
        probe: str = "exact",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = dict(lr=lr, mu=mu, weight_decay=weight_decay)
        super().__init__(
            params, defaults, seed=seed, state_dtype=None, options={"num_probes": num_probes}, probe=probe,
            stochastic_rounding=stochastic_rounding,
        )  # fmt: skip

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:
        ctx, seeds, mus, g, loss, ok = self._probe_step(closure)
        if not ok:
            return loss
        slots, q = ctx.slots, len(seeds)
        lrs = [float(s.group["lr"]) for s in slots]
        decay = [1.0 - lr * float(s.group["weight_decay"]) for lr, s in zip(lrs, slots)]
        last = q - 1
        # In place, theta is at theta0 - mu z_last: restore and update in one pass (exact: update).
        at = self.left_at(mus)
        alpha = [-b * a - lr * gi / q for b, a, lr, gi in zip(decay, at, lrs, g[last])]
        # every pass writes the parameters: bfloat16/float16 ones round stochastically, pass j with
        # its own rounding seed (docs/algorithms.md, "Stochastic rounding")
        ctx.noise.update_(slots, seeds[last], alpha, decay, self._rounding_seed(ctx.step, last))
        for j in range(last):
            ctx.noise.update_(slots, seeds[j], [-lr * gi / q for lr, gi in zip(lrs, g[j])], 1.0,
                              self._rounding_seed(ctx.step, j))  # fmt: skip
        _sharding.resync([s.param for s in slots if s.shard is not None])
        return loss


class MeZOAdam(_TwoSidedZO):
    r"""MeZO-Adam: the zeroth-order gradient estimate ``(1/q) sum_j g_j z_j`` fed to AdamW.

    ``g_j`` as in :class:`MeZO`. The estimate is regenerated into float32 temporaries, a bucket of
    parameters at a time (``_functional.BUCKET_NUMEL`` elements: one bucket for models up to 67M
    parameters), with one ``seeded_axpby_`` call per probe and bucket, then the AdamW update of
    ``torch.optim.AdamW`` is applied to the bucket (``_functional.adamw_``). State: ``step`` (int),
    ``exp_avg`` and ``exp_avg_sq`` in ``state_dtype`` (float32 by default): two parameter-sized
    buffers, the memory table's "2 x params". Exists as a baseline (``docs/algorithms.md``).

    Default ``lr = 1e-5``: Adam normalises the estimate, so each coordinate moves by about ``lr``
    per step as in first-order Adam fine-tuning of a language model, where 1e-5 is the usual scale
    (``docs/algorithms.md``, "Defaults").
    """

    group_checks = {
        **SeededOptimizer.group_checks,
        "mu": _checks.positive,
        "betas": _checks.betas,
        "eps": _checks.non_negative,
    }

    def __init__(
        self,
        params: Any,
        lr: float = 1e-5,
        *,
        mu: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        num_probes: int = 1,
        seed: int = 0,
        state_dtype: torch.dtype | None = torch.float32,
        probe: str = "exact",
        stochastic_rounding: bool = True,
    ) -> None:
        defaults = dict(lr=lr, mu=mu, betas=betas, eps=eps, weight_decay=weight_decay)
        super().__init__(
            params, defaults, seed=seed, state_dtype=state_dtype, options={"num_probes": num_probes}, probe=probe,
            stochastic_rounding=stochastic_rounding,
        )  # fmt: skip

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:
        ctx, seeds, mus, g, loss, ok = self._probe_step(closure)
        if not ok:
            return loss
        slots, q = ctx.slots, len(seeds)
        if self.probe == "inplace":
            ctx.noise.apply_(slots, seeds[-1], mus)  # back from theta - mu z_last
        for idx in buckets(len(slots), [s.data.numel() for s in slots]):
            part = [slots[i] for i in idx]
            grads = self._estimate(part, seeds, [[g[j][s.index] / q for s in part] for j in range(q)])
            adamw_slots_(self.state, part, grads, self.state_dtype, rounding_seed=self._rounding_seed(ctx.step))
        _sharding.resync([s.param for s in slots if s.shard is not None])
        return loss

    @staticmethod
    def _estimate(slots: Sequence[Slot], seeds: Sequence[int], coefs: Sequence[Sequence[float]]) -> list[torch.Tensor]:
        """``sum_j coefs[j][i] z_j`` for every slot ``i``, float32: one kernel call per probe (a
        sharded slot's shard only, with the noise of its global indices)."""
        bufs = [torch.empty(s.data.shape, dtype=torch.float32, device=s.data.device) for s in slots]
        streams, offsets = [s.stream for s in slots], offsets_of(slots)
        for j, seed in enumerate(seeds):
            seeded_axpby_slots_(bufs, streams, seed, coefs[j], 0.0 if j == 0 else 1.0, offsets=offsets)
        return bufs
