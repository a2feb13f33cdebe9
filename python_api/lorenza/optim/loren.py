"""LOREN (Seung, Lee, Ko, 2025, "Low-Rank Curvature for Zeroth-Order Optimization in LLM
Fine-Tuning", https://arxiv.org/abs/2511.07971): zeroth-order optimisation whose perturbation
covariance ``(I + a_bar a_bar^T / lambda_d)^-1`` is learned by natural evolution strategies.

Public implementation: https://github.com/hseung88/loren (``model/glue_transformer_loren.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

import lorenza_kernels as lk

from . import _checks, _sharding
from ._base import SeededOptimizer
from ._functional import buckets
from ._noise import ProbeTargets, Slot, offsets_of, rounds_stochastically, seeded_axpby_slots_
from ._seeds import INIT_STEP, probe_seed

__all__ = ["COVARIANCE_FORMS", "Loren"]

#: LOREN's covariance updates: "paper" (the published form, whose step scales like mu^4 times the
#: curvature and is inert at the defaults) and "normalized" (the same estimator as a direction, with
#: a step of relative size lr_cov: ||a_new - a|| = lr_cov ||a||); docs/algorithms.md, "LOREN".
COVARIANCE_FORMS = ("paper", "normalized")


def _by_value(indices: Sequence[int], values: Sequence[float]) -> dict[float, list[int]]:
    """``indices`` grouped by ``values[i]`` (one multi-tensor call per distinct value)."""
    out: dict[float, list[int]] = {}
    for i in indices:
        out.setdefault(values[i], []).append(i)
    return out


class Loren(SeededOptimizer):
    r"""LOREN, ``docs/algorithms.md`` "LOREN", with its **choice**.

    Per tensor ``X`` (``m x n`` view) the state is ``a`` (length ``n``, float32) and, for tensors of
    two or more dimensions, a heavy-ball buffer ``momentum_buffer`` (``state_dtype``). With
    ``s = m ||a||^2``, ``D = sqrt(damping + s)``, ``c = (sqrt(damping) + D) / (s D)`` and
    ``S(a) u = u - c <a_bar, u> a_bar``, per step ``t`` and query ``k < K`` (``K = num_queries``,
    ``u_k`` from ``(probe_seed(seed, t, k), stream of the parameter)``; every application below is
    one kernel call over all parameters):

    1. ``f_k = L(X + mu S(a) u_k)`` (perturb, evaluate under ``torch.no_grad()``, restore; the
       ``K`` losses are averaged over ranks in one all-reduce);
    2. ``w_k = (f_k - mean f) / (mu (K - 1))``, ``g = sum_k w_k S(a) u_k``;
    3. matrices ``M <- momentum M + g``, ``X <- X (1 - lr wd) - lr M``; vectors
       ``X <- X (1 - lr wd) - lr g``;
    4. ``a <- a - lr_cov g_a`` with ``p_k = <a_bar, u_k>`` and
       ``g_a = sum_k (f_k - mean f)/(K - 1) mu^2 [p_k colsum(u_k) - m a - c (p_k^2 - s) m a] / D``.

    No ``u`` is stored: ``p_k`` and ``colsum(u_k)`` come from ``lorenza_kernels.seeded_loren_stats``
    (no pass over the parameters), and every application of ``S(a) u_k`` (to ``X`` and to ``M``) is
    one ``seeded_axpby_`` pass with the rank-one term ``gamma 1 a^T``, ``gamma = -coef c p_k``. The
    restore of the last query is fused with the weight decay and, for vectors, with the last
    query's update term.

    **choice** (differences from the public implementation, which this class does not follow):

    * ``a`` stays fixed for the whole step and ``X``, ``M`` are updated once per step with the
      aggregated ``g``. The public code loops over the queries after evaluating them and, per
      query, updates ``M``, ``X`` (with weight decay, so ``K`` times per step) and ``a``, so the
      later queries' ``S(a) u_k`` use an ``a`` that differs from the one they were evaluated with.
    * For 1-D tensors (``m = 1``) ``g_a`` is the per-coordinate vector of the formula. The public
      code sums it to one scalar (``ak_grad.view(shape).sum(0)``) that moves every coordinate of
      ``a`` alike, which looks unintended.

    Smaller differences: the public code also applies ``weight_decay`` to ``a`` (here ``a`` gets
    none, as in docs/algorithms.md) and keeps ``a`` and ``M`` in the parameter's dtype (here float32 by
    default). ``a`` is initialised ``N(0, I)`` from the project's stream:
    ``a = gaussian(n, probe_seed(seed, 0, 0), stream of the parameter)`` (step 0 is reserved for
    initialisation), instead of ``torch.randn``.

    ``covariance``: ``"paper"`` (default), the published step ``-lr_cov g_a``. At the published
    ``mu``, ``damping`` and ``lr_cov`` this step is about 1e-12 of ``||a||``, so ``a`` keeps its
    random initialisation. ``"normalized"``: the same direction with a step of relative size
    ``lr_cov``, so ``a`` learns. Use it with ``lr_cov`` from 1e-2 to 1e-1. It damped the sharpest
    direction and lowered the loss on an ill-conditioned least-squares problem, and made no
    measurable difference on an MLP or on the demo's LM fine-tune. The measurement and the reason
    for the default are in ``docs/algorithms.md``, "LOREN". ``covariance_steps()`` gives the
    relative step of each ``a``, to log.

    Memory: MeZO's plus the momentum of the matrices plus the vectors ``a`` (and, during a step,
    ``K`` column sums of length ``n`` per tensor).

    Sharded parameters (FSDP2, ``docs/algorithms.md`` "Distributed training"): a matrix's rows are
    split over the ranks and its ``a`` (one value per column) is whole on every rank; a 1-D
    parameter's elements are its columns, so its ``a`` is split like it (a DTensor). ``p_k`` and the
    column sums are per-shard partial sums (``seeded_loren_stats`` with offsets), added over the
    ranks: ``p_k`` (and ``||a||^2`` of split vectors) in one all-reduce before the queries, the
    covariance step's column sums (and norms) in one or two after them. Non-finite query loss: the perturbation is
    removed, nothing is updated, the skip counted and warned once. Returns the mean query loss.

    Default ``lr = 1e-6``, MeZO's: the update is a zeroth-order gradient estimate of MeZO's scale
    (not normalised), so the same reasoning applies (``docs/algorithms.md``, "Defaults").
    """

    group_checks = {
        **SeededOptimizer.group_checks,
        "mu": _checks.positive,
        "damping": _checks.positive,
        "lr_cov": _checks.non_negative,
        "momentum": _checks.unit_interval,
    }
    global_checks = {"num_queries": 2}

    def __init__(
        self,
        params: Any,
        lr: float = 1e-6,
        *,
        mu: float = 1e-3,
        damping: float = 0.1,
        lr_cov: float = 1e-3,
        num_queries: int = 10,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        seed: int = 0,
        state_dtype: torch.dtype | None = torch.float32,
        probe: str = "exact",
        stochastic_rounding: bool = True,
        covariance: str = "paper",
    ) -> None:
        _checks.choice("covariance", covariance, COVARIANCE_FORMS)
        defaults = dict(lr=lr, mu=mu, damping=damping, lr_cov=lr_cov, momentum=momentum, weight_decay=weight_decay)
        super().__init__(
            params, defaults, seed=seed, state_dtype=state_dtype, options={"num_queries": num_queries}, probe=probe,
            stochastic_rounding=stochastic_rounding,
        )  # fmt: skip
        self._global["covariance"] = covariance

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        glob = state_dict.get("lorenza") if isinstance(state_dict, dict) else None
        if isinstance(glob, dict):
            glob.setdefault("covariance", "paper")  # saved before the option existed
            _checks.choice("state_dict['lorenza']['covariance']", glob["covariance"], COVARIANCE_FORMS)
        super().load_state_dict(state_dict)

    def covariance_steps(self) -> dict[int, float]:
        """``||a_t - a_{t-1}|| / ||a_{t-1}||`` of the last step, per parameter stream (0 before the
        first step and when ``lr_cov`` is 0): the size of the covariance update, to log. At the paper's
        defaults it is below 1e-11, under float32's resolution of ``a`` (``docs/algorithms.md``,
        "LOREN": the covariance forms)."""
        out = {}
        for slot in self._slots():
            st = self.state.get(slot.param, {})
            v = st.get("cov_step")
            out[slot.stream] = float(v) if v is not None else 0.0
        return out

    def _init_states(self, slots: Sequence[Slot]) -> list[dict]:
        """The slots' states; the new ones get ``a = gaussian(n, probe_seed(seed, 0, 0), stream)``
        (all in one kernel call) and, for matrices, a zero momentum buffer. A sharded 1-D parameter's
        ``a`` is its shard's part of that vector (its columns are its elements), kept as a DTensor
        split like the parameter; a matrix's is whole on every rank."""
        states = [self.state[s.param] for s in slots]
        new = [k for k, st in enumerate(states) if "a" not in st]
        if new:
            split = [slots[k].shard is not None and slots[k].param.dim() < 2 for k in new]
            rows = [
                torch.empty(
                    lk.matrix_dims(slots[k].data if sp else slots[k].param)[1], dtype=torch.float32,
                    device=slots[k].data.device,
                )
                for k, sp in zip(new, split)
            ]  # fmt: skip
            offs = [slots[k].offset if sp else 0 for k, sp in zip(new, split)]
            seeded_axpby_slots_(rows, [slots[k].stream for k in new], probe_seed(self.seed, INIT_STEP, 0), 1.0, 0.0,
                                offsets=offs if any(split) else None)  # fmt: skip
            for k, a, sp in zip(new, rows, split):
                states[k]["a"] = _sharding.sharded_like(slots[k].param.shape, a, slots[k].param) if sp else a
                if slots[k].param.dim() >= 2:
                    states[k]["momentum_buffer"] = torch.zeros_like(
                        slots[k].param, dtype=self.state_dtype or slots[k].param.dtype,
                        memory_format=torch.contiguous_format,
                    )  # fmt: skip
        return states

    @staticmethod
    def _stats(
        slots: Sequence[Slot], seed: int, rows: Sequence[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``p_k`` and the column sums of ``u`` for every slot: one kernel call (shapes only are read;
        a shard's are its partial sums)."""
        if not slots:
            return torch.zeros(0), []
        return lk.seeded_loren_stats(
            [s.data.detach() for s in slots], seed, rows, streams=[s.stream for s in slots], offsets=offsets_of(slots)
        )

    @staticmethod
    def _rounded_momentum_step(slots, bufs, lrs, decays, rounding_seed: int) -> None:
        """``X <- SR(X decay - lr M)`` for low-precision matrices: the arithmetic on float32 images
        (a bucket of at most ``BUCKET_NUMEL`` elements at a time), one stochastic rounding each."""
        for idx in buckets(len(slots), [s.data.numel() for s in slots]):
            params = [slots[i].data for i in idx]
            work = [p.float() for p in params]
            torch._foreach_mul_(work, [decays[i] for i in idx])
            torch._foreach_add_(work, torch._foreach_mul([bufs[i] for i in idx], [-lrs[i] for i in idx]))
            lk.stochastic_round_(params, work, rounding_seed, streams=[slots[i].stream for i in idx],
                                 offsets=offsets_of([slots[i] for i in idx]))  # fmt: skip

    @staticmethod
    def _materializer(slots, seed: int, mus, c, p, rows, full_rows):
        """``make(param)``: a copy of the parameter plus ``mu S(a) u`` of this query (exact probes).
        ``param`` may be the whole all-gathered value of a sharded parameter (``full_rows``: the whole
        ``a``) or a DTensor read as itself (its shard gets its part)."""
        index = {id(s.param): i for i, s in enumerate(slots)}
        targets = ProbeTargets(slots).by_id

        def make(param: torch.Tensor) -> torch.Tensor:
            i = index.get(id(param))
            if i is None:
                hit = targets.get(id(param))
                if hit is None:  # an FSDP2 parameter all-gathered for the first time since: look again
                    targets.update(ProbeTargets(slots).by_id)
                    hit = targets[id(param)]
                i = hit.index
            out = param.detach().clone(memory_format=torch.contiguous_format)
            data = _sharding.local(out)
            whole = data.numel() == slots[i].param.numel()
            seeded_axpby_slots_(
                [data], [slots[i].stream], seed, [mus[i]], 1.0, row_vectors=[full_rows[i] if whole else rows[i]],
                gamma=[-mus[i] * c[i] * p[i]], offsets=None if whole else [slots[i].offset],
            )  # fmt: skip
            return out

        return make

    @staticmethod
    def _full_rows(slots: Sequence[Slot], rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Every slot's whole ``a``: the split ones (sharded 1-D parameters) gathered, in one collective."""
        split = [k for k, s in enumerate(slots) if s.shard is not None and s.param.dim() < 2]
        out = list(rows)
        if split:
            full = _sharding.all_gather_rows(
                [rows[k].reshape(-1, 1) for k in split], [slots[k].param.numel() for k in split],
                slots[split[0]].shard.group,
            )  # fmt: skip
            for k, f in zip(split, full):
                out[k] = f.reshape(-1)
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:
        closure = self._require_closure(closure)
        fresh = [p for g in self.param_groups for p in g["params"] if p.requires_grad and p not in self.state]
        try:
            return self._step(closure)
        except BaseException:  # a failed step leaves the state as it was: drop what it initialised
            for p in fresh:
                self.state.pop(p, None)
            raise

    def _step(self, closure: Callable[[], Any]) -> torch.Tensor:
        t = self._global["step"] + 1
        K = self._global["num_queries"]
        slots = self._slots()
        states = self._init_states(slots)
        rows = [_sharding.local(st["a"]) for st in states]
        seeds = [probe_seed(self.seed, t, k) for k in range(K)]
        stats = [self._stats(slots, seed, rows) for seed in seeds]
        n = len(slots)
        # One host synchronisation for every scalar the kernel calls need: ||a||^2 and p_k (for
        # sharded parameters, partial sums added over the ranks in one all-reduce first).
        scalars = []
        if n:
            vec = torch.cat(
                [torch.stack([r.double().square().sum() for r in rows])]
                + [ps.to(rows[0].device, torch.float64) for ps, _ in stats]
            )  # fmt: skip
            split = [s.shard is not None and s.param.dim() < 2 for s in slots]
            summed = [k for k in range(n) if split[k]]
            summed += [n + k * n + i for k in range(K) for i in range(n) if slots[i].shard is not None]
            if summed:
                part = vec[summed].clone()
                _sharding.all_reduce_(part, next(s.shard.group for s in slots if s.shard is not None))
                vec[summed] = part
            scalars = vec.tolist()
        m = [lk.matrix_dims(s.param)[0] for s in slots]
        s_ = [mi * a2 for mi, a2 in zip(m, scalars[:n])]
        damping = [float(s.group["damping"]) for s in slots]
        D = [math.sqrt(lam + si) for lam, si in zip(damping, s_)]
        c = [(math.sqrt(lam) + Di) / (si * Di) if si > 0.0 else 0.0 for lam, Di, si in zip(damping, D, s_)]
        p = [scalars[n + k * n : n + (k + 1) * n] for k in range(K)]
        mus = [float(s.group["mu"]) for s in slots]

        def apply(subset: Sequence[int], k: int, coef: Sequence[float], beta: float | Sequence[float] = 1.0, on=None,
                  rounding: int | None = None):  # fmt: skip
            """``x <- beta x + coef S(a) u_k`` for the slots ``subset`` (on their params, or ``on``);
            an update pass of the parameters gives ``rounding`` (its pass number) for stochastic rounding."""
            gamma = [-cf * c[i] * p[k][i] for cf, i in zip(coef, subset)]
            tensors = [slots[i].data for i in subset] if on is None else [on[i] for i in subset]
            rseed = self._rounding_seed(t, rounding) if rounding is not None else None
            seeded_axpby_slots_(
                tensors, [slots[i].stream for i in subset], seeds[k], coef, beta,
                row_vectors=[rows[i] for i in subset], gamma=gamma, rounding_seed=rseed,
                rounds=[rounds_stochastically(slots[i]) for i in subset] if rseed is not None else None,
                offsets=offsets_of([slots[i] for i in subset]),
            )  # fmt: skip

        everyone = list(range(n))
        exact = self.probe == "exact"
        full_rows = self._full_rows(slots, rows) if exact else rows
        losses, applied = [], None
        try:
            for k in range(K):
                if exact:  # the parameters are never written: read perturbed where they are used
                    make = self._materializer(slots, seeds[k], mus, c, p[k], rows, full_rows)
                    with ProbeTargets(slots).mode(make):
                        losses.append(self._probe_loss(closure, slots))
                    continue
                apply(everyone, k, mus)
                applied = k
                losses.append(self._probe_loss(closure, slots))
                if k + 1 < K:
                    apply(everyone, k, [-mu for mu in mus])
                    applied = None
        except BaseException:
            if applied is not None:
                apply(everyone, applied, [-mu for mu in mus])
            raise
        f, _ = self._reduce(losses)
        mean_loss = torch.tensor(sum(f) / K)
        if not all(math.isfinite(v) for v in f):
            if not exact:
                apply(everyone, K - 1, [-mu for mu in mus])
            self._skip(f"non-finite loss in a query ({f})")
            self._global["step"] = t
            _sharding.resync([s.param for s in slots if s.shard is not None])
            return mean_loss
        self._global["step"] = t
        f_bar = sum(f) / K
        d = [fk - f_bar for fk in f]
        w = [[dk / (mu * (K - 1)) for mu in mus] for dk in d]
        lrs = [float(s.group["lr"]) for s in slots]
        decay = [1.0 - lr * float(s.group["weight_decay"]) for lr, s in zip(lrs, slots)]
        matrices = [i for i in everyone if slots[i].param.dim() >= 2]
        vectors = [i for i in everyone if slots[i].param.dim() < 2]
        is_vec = [slots[i].param.dim() < 2 for i in everyone]

        last = K - 1
        # Low-precision matrices that round stochastically take decay and momentum step on a float32
        # image, rounded once (below); the others are updated in place as before.
        sr_matrices = [i for i in matrices if rounds_stochastically(slots[i])]
        if exact:
            # Vectors: X <- X (1 - lr wd) - lr g, the decay in the first query's pass; pass k rounds
            # with its own rounding seed.
            for k in range(K):
                if vectors:
                    first = [decay[i] for i in vectors] if k == 0 else 1.0
                    apply(vectors, k, [-lrs[i] * w[k][i] for i in vectors], first, rounding=k)
            decayed = [i for i in matrices if decay[i] != 1.0 and i not in sr_matrices]
            for dk, members in _by_value(decayed, decay).items():
                torch._foreach_mul_([slots[i].data for i in members], dk)
        else:
            # Restore the last query, decay, and (vectors) the last query's term: one pass.
            restore = [-decay[i] * mus[i] - (lrs[i] * w[last][i] if is_vec[i] else 0.0) for i in everyone]
            apply(everyone, last, restore, decay)
            for k in range(last):
                if vectors:
                    apply(vectors, k, [-lrs[i] * w[k][i] for i in vectors], rounding=k)
        if matrices:
            bufs = [_sharding.local(st.get("momentum_buffer")) for st in states]
            for k in range(K):
                beta = [float(slots[i].group["momentum"]) for i in matrices] if k == 0 else 1.0
                apply(matrices, k, [w[k][i] for i in matrices], beta, on=bufs)
            plain = [i for i in matrices if i not in sr_matrices]
            for lr, members in _by_value(plain, lrs).items():  # one call per learning rate, no temporary
                torch._foreach_add_([slots[i].data for i in members], [bufs[i] for i in members], alpha=-lr)
            if sr_matrices:
                self._rounded_momentum_step(
                    [slots[i] for i in sr_matrices], [bufs[i] for i in sr_matrices], [lrs[i] for i in sr_matrices],
                    [decay[i] if exact else 1.0 for i in sr_matrices], self._rounding_seed(t, K),
                )  # fmt: skip

        # Covariance: a <- a - lr_cov g_a = a (1 + lr_cov scale) - lr_cov cols, with this step's a, c, p_k.
        live = [i for i in everyone if float(slots[i].group["lr_cov"]) != 0.0 and s_[i] != 0.0]
        for i in everyone:
            if i not in live:
                states[i]["cov_step"] = torch.zeros((), dtype=torch.float32, device=rows[i].device)
        if live:
            lr_cov = [float(slots[i].group["lr_cov"]) for i in live]
            # g_a = mu^2 sqrt(lambda) S with S = sum_k (f_k - f_bar)/(K-1) grad_a log p(eps_k), the
            # score-function estimate of grad_a E[L(X + eps)] (docs/algorithms.md, "LOREN")
            normalized = self._global.get("covariance", "paper") == "normalized"
            coef = [[d[k] / (K - 1) * mus[i] * mus[i] / D[i] for k in range(K)] for i in live]
            cols = torch._foreach_mul([stats[0][1][i] for i in live], [cf[0] * p[0][i] for cf, i in zip(coef, live)])
            for k in range(1, K):
                term = torch._foreach_mul(
                    [stats[k][1][i] for i in live], [cf[k] * p[k][i] for cf, i in zip(coef, live)]
                )
                torch._foreach_add_(cols, term)
            scale = [
                sum(cf[k] * (1.0 + c[i] * (p[k][i] ** 2 - s_[i])) for k in range(K)) * m[i] for cf, i in zip(coef, live)
            ]
            # a sharded matrix's column sums are its rows' part: add them over the ranks
            rowsplit = [j for j, i in enumerate(live) if slots[i].shard is not None and slots[i].param.dim() >= 2]
            cols = list(cols)
            if rowsplit:
                flat = torch.cat([cols[j] for j in rowsplit])
                _sharding.all_reduce_(flat, slots[live[rowsplit[0]]].shard.group)
                for j, piece in zip(rowsplit, flat.split([cols[j].numel() for j in rowsplit])):
                    cols[j] = piece
            a_list = [rows[i] for i in live]
            # the step a_new - a = -lr_cov g_a = lr_cov (scale a - cols), and its size relative to ||a||
            delta = torch._foreach_mul(a_list, [lc * sc for lc, sc in zip(lr_cov, scale)])
            torch._foreach_add_(delta, torch._foreach_mul(cols, [-lc for lc in lr_cov]))
            a_norms = list(torch._foreach_norm(a_list))
            d_norms = list(torch._foreach_norm(delta))
            split = [j for j, i in enumerate(live) if slots[i].shard is not None and slots[i].param.dim() < 2]
            if split:  # a split vector's norms are over the ranks
                sq = torch.stack([a_norms[j] for j in split] + [d_norms[j] for j in split]).double().square()
                _sharding.all_reduce_(sq, slots[live[split[0]]].shard.group)
                root = sq.sqrt().float()
                for q, j in enumerate(split):
                    a_norms[j], d_norms[j] = root[q], root[len(split) + q]
            if normalized:  # the direction of -g_a, a step of lr_cov ||a||: mu and the loss scale cancel
                factors = torch._foreach_div(torch._foreach_mul(a_norms, lr_cov), torch._foreach_add(d_norms, 1e-30))
                torch._foreach_mul_(delta, factors)
                d_norms = torch._foreach_mul(d_norms, factors)
            rel = torch._foreach_div(d_norms, a_norms)
            torch._foreach_add_(a_list, delta)
            for i, r in zip(live, rel):
                states[i]["cov_step"] = r
        _sharding.resync([s.param for s in slots if s.shard is not None])
        return mean_loss
