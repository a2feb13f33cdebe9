"""The subspaces of the projected optimizers (LORENZA, Lorenza+, GaLore-AdamW), as a component.

Which parameters are projected (``docs/algorithms.md``, "LORENZA"): a parameter of 2 or more
dimensions, viewed as ``m x n`` (``lorenza_kernels.matrix_dims``: ``shape[0] x rest``), whose group
has ``rank`` r with ``1 <= r < min(m, n)``; GaLore's side rule (``lorenza_kernels.projection_side``)
puts the basis on the right when ``m >= n``. Every other parameter is dense. **choice**:
``rank >= min(m, n)`` makes that matrix dense rather than an error (a rank-``min(m, n)`` subspace
is the whole space, and dense Adam stores less than ``Q`` plus moments would).

State of a projected parameter (float32; the memory table's ``Q + 2 r max(m, n)``):
``proj`` (the basis ``Q``), ``exp_avg``, ``exp_avg_sq`` (of ``R``'s shape), ``step`` (Adam's
bias-correction count; restarts at 0 on ``moment_transform="reset"``), ``updates`` (projected
updates taken; the basis is (re)built from the gradient of the update with
``updates % update_interval == 0``, GaLore's ``iter % update_proj_gap == 0``) and ``refreshes``.

A step's refreshes are planned when it starts (:meth:`Subspace.plan`), from the state alone, so
every rank of a distributed job and every resumed run plans the same ones. Planned matrix ``k``
(parameter order) is sketched from stream ``k`` of ``probe_seed(seed, step, RESERVED_PROBE_BASE)``:
normal mode refreshes every planned matrix in one ``randomized_range_list`` call, per-layer mode
each matrix alone in its hook, with the same stream, so both agree. The projected Adam step is one
``projected_adam_step_batched_`` call per (shape, dtypes, side, group) bucket, and the moment
transform one ``moment_transform_`` call per side.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

import lorenza_kernels as lk

from . import _checks, _sharding
from ._functional import buckets
from ._noise import DenseNoise, Slot, rounds_stochastically, seeded_axpby_slots_
from ._seeds import RESERVED_PROBE_BASE, probe_seed

__all__ = [
    "Layout",
    "MOMENT_TRANSFORMS",
    "PROBE_SPACES",
    "SVDS",
    "Subspace",
    "SubspaceNoise",
    "SubspacePlan",
    "refresh_bases",
]

SVDS = ("exact", "randomized")
MOMENT_TRANSFORMS = lk.MODES  # "rotate", "keep", "reset"


def group_default_rank(params: Any, rank: int | None) -> tuple[list, int | None]:
    """galore-torch's group convention, shared by GaLore-AdamW and LORENZA: when any group names a
    ``rank``, a group that does not is dense (the default ``rank`` is not applied to it); otherwise
    ``rank`` is every group's default. Returns the parameters as a list and the default rank."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params: expected an iterable of tensors or of dicts, got a tensor")
    params = list(params)
    galore_groups = any(isinstance(g, dict) and "rank" in g for g in params)
    return params, None if galore_groups else rank


def check_rank(name: str, value: Any) -> None:
    if value is not None:
        _checks.int_at_least(name, value, 1)


LOWRANK_GROUP_CHECKS: dict[str, _checks.Check] = {
    "rank": check_rank,
    "update_interval": lambda name, value: _checks.int_at_least(name, value, 1),
    "scale": _checks.non_negative,
}


class Layout(NamedTuple):
    """How one projected parameter is seen: its ``m x n`` view, side, rank, ``Q``'s and ``R``'s shapes."""

    m: int
    n: int
    side: str
    rank: int
    proj_shape: tuple[int, int]
    moment_shape: tuple[int, int]


def layout_of(param: torch.Tensor, rank: int | None) -> Layout | None:
    if rank is None or param.dim() < 2:
        return None
    m, n = lk.matrix_dims(param)
    if rank >= min(m, n):
        return None
    side = lk.projection_side(m, n)
    return Layout(m, n, side, rank, *lk._shapes.projected_shapes(m, n, rank, side))


@dataclass
class SubspacePlan:
    """One step's view of the subspaces: each slot's layout (None: dense) and the refreshes due."""

    step: int
    seed: int  # of the randomized-SVD sketches
    layouts: dict[int, Layout | None]  # slot.index -> layout
    position: dict[int, int]  # slot.index -> stream of its sketch (position among the refreshes)


@torch.no_grad()
def refresh_bases(
    matrices: Sequence[torch.Tensor],
    ranks: Sequence[int],
    sides: Sequence[str],
    *,
    svd: str,
    seed: int,
    streams: Sequence[int],
    oversample: int = 8,
    power_iters: int = 1,
    factors: bool = False,
) -> list:
    """Orthonormal float32 bases (``d x r``, contiguous) of the dominant subspaces, in input order.

    ``svd="exact"``: ``torch.linalg.svd`` of the float32 matrix, truncated: exactly GaLore's
    ``get_orthogonal_matrix`` (https://github.com/jiaweizzhao/GaLore, same call, same input, same
    LAPACK signs), so GaLore-AdamW reproduces galore-torch. ``svd="randomized"``: the batched
    randomized SVD, all matrices in one ``lorenza_kernels`` call, matrix ``i`` sketched from stream
    ``streams[i]`` of ``seed``.

    With ``factors=True`` each entry is ``(Q, F)``: ``F`` the singular vectors of the other side
    (``m x r`` when ``Q`` is the right basis, ``n x r`` for the left), so that ``G_r = U S V^T`` has
    ``{U, V} = {Q, F}``: what LORENZA's probes ``U diag(u) V^T`` need. The randomized path then runs
    the batched randomized SVD of ``G`` (right side) or ``G^T`` (left side), so that ``Q`` is always
    the more accurate side of the sketch, as ``randomized_range`` makes it.
    """
    if svd == "exact":
        out = []
        for A, r, side in zip(matrices, ranks, sides):
            U, _, Vh = torch.linalg.svd(A if A.dtype == torch.float32 else A.float(), full_matrices=False)
            Q = (U[:, :r] if side == "left" else Vh[:r].t()).contiguous()
            out.append((Q, (Vh[:r].t() if side == "left" else U[:, :r]).contiguous()) if factors else Q)
        return out
    if not matrices:
        return []
    if factors:
        views = [A if side == "right" else A.mT for A, side in zip(matrices, sides)]
        svds = lk.randomized_svd_list(
            views, list(ranks), oversample=oversample, power_iters=power_iters, seed=seed, streams=list(streams)
        )
        return [(Vh.t().contiguous(), U.contiguous()) for U, _, Vh in svds]
    bases = lk.randomized_range_list(
        list(matrices), list(ranks), sides=list(sides), oversample=oversample, power_iters=power_iters, seed=seed,
        streams=list(streams),
    )  # fmt: skip
    return [Q if Q.is_contiguous() else Q.contiguous() for Q in bases]


def row_split(param: torch.Tensor, key: str, entry: dict) -> bool | str | None:
    """How the state tensors of a projected parameter are split under FSDP2 (the optimizers'
    ``_row_split``): by the parameter's rows (True) those of ``R = G Q`` (right side) and ``Q``
    (left side); by columns (``"cols"``) the ``r x n`` moments of the left side; the rest is whole
    (False). None for a dense parameter (no ``proj``: the base rule)."""
    if "proj" not in entry:
        return None
    side = lk.projection_side(*lk.matrix_dims(param))
    if side == "left":
        return True if key == "proj" else "cols" if key in ("exp_avg", "exp_avg_sq") else False
    return key in ("exp_avg", "exp_avg_sq", "factor")


class Subspace:
    """The bases and projected Adam moments of an optimizer's matrices (a component it holds).

    It reads the optimizer's per-parameter ``state`` and global options (``svd``, ``oversample``,
    ``power_iters``) through a weak reference: ``load_state_dict`` replaces both objects.
    """

    def __init__(self, optimizer: Any):
        self._owner = weakref.ref(optimizer)

    def layout(self, slot: Slot) -> Layout | None:
        lay = layout_of(slot.param, slot.group["rank"])
        state = self._owner().state.get(slot.param, {})
        if state:
            had = state.get("proj")
            if (lay is None) != (had is None) or (had is not None and had.shape != lay.proj_shape):
                was = "dense" if had is None else f"rank {had.shape[1]}"
                now = "dense" if lay is None else f"rank {lay.rank}"
                raise ValueError(
                    f"param_groups: the group 'rank' of a {tuple(slot.param.shape)} parameter changed after its "
                    f"state was built ({was} -> {now}); the rank of a parameter is fixed once it has state"
                )
        return lay

    def plan(self, slots: Sequence[Slot], step: int) -> SubspacePlan:
        opt = self._owner()
        layouts = {s.index: self.layout(s) for s in slots}
        due = []
        for s in slots:
            if layouts[s.index] is None:
                continue
            state = opt.state.get(s.param, {})
            if "proj" not in state or state["updates"] % int(s.group["update_interval"]) == 0:
                due.append(s.index)
        seed = probe_seed(opt.seed, step, RESERVED_PROBE_BASE)
        return SubspacePlan(step, seed, layouts, {i: k for k, i in enumerate(due)})

    # --- the update -------------------------------------------------------------------------------

    def update(
        self,
        plan: SubspacePlan,
        slots: Sequence[Slot],
        grads: Sequence[torch.Tensor],
        *,
        moment_transform: str,
        adam_scalars: Callable[[dict, int], tuple[float, float]],
        factors: bool = False,
        rounding_seed: int | None = None,
    ) -> None:
        """Refresh the due bases of ``slots`` (one SVD call), carry their moments, then one projected
        Adam call per bucket of same-shape layers. ``adam_scalars(group, step)`` gives ``(eps, scale)``.
        With ``rounding_seed`` the bfloat16/float16 matrices of groups that keep
        ``stochastic_rounding`` are written back stochastically, each from its own stream."""
        opt = self._owner()
        glob = opt._global
        due = [k for k, s in enumerate(slots) if s.index in plan.position]
        if due:
            lays = [plan.layouts[slots[k].index] for k in due]
            whole = [j for j, k in enumerate(due) if slots[k].shard is None]
            bases: list[Any] = [None] * len(due)
            found = refresh_bases(
                [grads[due[j]].reshape(lays[j].m, lays[j].n) for j in whole], [lays[j].rank for j in whole],
                [lays[j].side for j in whole], svd=glob["svd"], seed=plan.seed,
                streams=[plan.position[slots[due[j]].index] for j in whole], oversample=glob.get("oversample", 8),
                power_iters=glob.get("power_iters", 1), factors=factors,
            )  # fmt: skip
            for j, Q in zip(whole, found):
                bases[j] = Q
            for j, k in enumerate(due):  # FSDP2's row-sharded gradients: the sharded randomized SVD
                if slots[k].shard is not None:
                    bases[j] = self._sharded_basis(slots[k], grads[k], lays[j], plan, glob, factors)
            self._install(opt.state, [slots[k] for k in due], lays, bases, moment_transform)
        buckets: dict[tuple, list[int]] = {}
        for k, s in enumerate(slots):
            st = opt.state[s.param]
            st["step"] += 1
            st["updates"] += 1
            eps, scale = adam_scalars(s.group, st["step"])
            lay = plan.layouts[s.index]
            key = (id(s.group), lay, s.param.dtype, grads[k].dtype, s.param.device, eps, scale)
            buckets.setdefault(key, []).append(k)
        for (_, lay, *_, eps, scale), members in buckets.items():
            part = [slots[k] for k in members]
            rseed = rounding_seed if rounding_seed is not None and rounds_stochastically(part[0]) else None
            self._projected_adam(opt.state, part, [grads[k] for k in members], lay, eps, scale, rseed)

    @staticmethod
    def _sharded_basis(slot: Slot, grad: torch.Tensor, lay: Layout, plan: SubspacePlan, glob: dict, factors: bool):
        """The basis of a row-sharded gradient (``_sharded_rsvd.py``): ``lorenza_kernels``'
        randomized range of the whole gradient, to rounding, never gathered; the left basis comes
        back as this rank's rows."""
        from ._sharded_rsvd import sharded_randomized_range

        if glob["svd"] != "randomized":  # refused at construction and load: a safeguard
            raise ValueError("svd: sharded (FSDP2) parameters need svd='randomized'")
        info = slot.shard
        out = sharded_randomized_range(
            grad.reshape(-1, lay.n), lay.m, info.row0, lay.rank, side=lay.side, oversample=glob.get("oversample", 8),
            power_iters=glob.get("power_iters", 1), seed=plan.seed, stream=plan.position[slot.index], group=info.group,
            factors=factors,
        )  # fmt: skip
        return (out[0].contiguous(), out[1].contiguous()) if factors else out.contiguous()

    @staticmethod
    def _install(state, slots, lays, bases, moment_transform: str) -> None:
        carry: dict[str, list[tuple]] = {}
        for slot, lay, Q in zip(slots, lays, bases):
            st = state[slot.param]
            info = slot.shard
            if isinstance(Q, tuple):  # (basis, the other side's singular vectors)
                Q, st["factor"] = Q
                if info is not None and lay.side == "right":  # U's rows follow the parameter's
                    st["factor"] = _sharding.sharded_like((lay.m, lay.rank), st["factor"], slot.param)
            if "proj" not in st:
                st["step"], st["updates"], st["refreshes"] = 0, 0, 0
                shape, dim = lay.moment_shape, 0
                if info is not None and lay.side == "right":  # R = G Q: this rank's rows of R
                    shape = (info.local.shape[0], lay.rank)
                elif info is not None:  # R = Q^T G (r x n): this rank's columns
                    c0, c1 = _sharding.col_range(lay.n, info.world, info.rank)
                    shape, dim = (lay.rank, c1 - c0), 1
                for key in ("exp_avg", "exp_avg_sq"):
                    st[key] = torch.zeros(shape, dtype=torch.float32, device=slot.param.device)
                    if info is not None:
                        st[key] = _sharding.sharded_like(lay.moment_shape, st[key], slot.param, dim=dim)
            elif info is not None and moment_transform != "keep":
                Subspace._sharded_transform(st, lay, Q, info, moment_transform)
            elif moment_transform != "keep":
                carry.setdefault(lay.side, []).append((st["exp_avg"], st["exp_avg_sq"], st["proj"], Q))
                if moment_transform == "reset":
                    st["step"] = 0  # bias correction starts over
            if info is not None and lay.side == "left":  # Q's rows follow the parameter's
                Q = _sharding.sharded_like(lay.proj_shape, Q, slot.param)
            st["proj"] = Q
            st["refreshes"] += 1
        for side, items in carry.items():
            lk.moment_transform_(*(list(x) for x in zip(*items)), side=side, mode=moment_transform)

    @staticmethod
    def _projected_adam(
        state, slots, grads, lay: Layout, eps: float, scale: float, rounding_seed: int | None = None
    ) -> None:
        if slots[0].shard is not None:
            Subspace._sharded_projected_adam(state, slots, grads, lay, eps, scale, rounding_seed)
            return
        group = slots[0].group
        params = [s.param for s in slots]
        work = [p if p.is_contiguous() else p.contiguous() for p in params]
        states = [state[p] for p in params]
        beta1, beta2 = group["betas"]
        lk.projected_adam_step_batched_(
            work, [g if g.is_contiguous() else g.contiguous() for g in grads], [st["proj"] for st in states],
            [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states], step=[st["step"] for st in states],
            lr=float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=eps,
            weight_decay=float(group["weight_decay"]), scale=scale, side=lay.side,
            residual_scale=float(group.get("residual_scale", 0.0)), rounding_seed=rounding_seed,
            rounding_streams=[s.stream for s in slots] if rounding_seed is not None else None,
        )  # fmt: skip
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)

    @staticmethod
    def _sharded_transform(st: dict, lay: Layout, Q: torch.Tensor, info: Any, mode: str) -> None:
        """The moment transform of a row-sharded matrix's refresh (``moment_transform_``'s reference
        arithmetic): ``O = Q_new^T Q_old`` is whole from whole right bases, and a sum over the ranks
        (one ``r x r`` all-reduce) from the rows of left bases; the right moments are this rank's
        rows, the left ones this rank's columns (``O`` mixes rows only)."""
        M, V = _sharding.local(st["exp_avg"]), _sharding.local(st["exp_avg_sq"])
        if mode == "reset":
            M.zero_()
            V.zero_()
            st["step"] = 0  # bias correction starts over
            return
        O = Q.float().t() @ _sharding.local(st["proj"]).float()  # noqa: E741 - r x r, docs/algorithms.md's O
        if lay.side == "left":
            _sharding.all_reduce_(O, info.group)
            M.copy_(O @ M.float())
            V.copy_((O * O) @ V.float())
        else:
            M.copy_(M.float() @ O.t())
            V.copy_(V.float() @ (O * O).t())

    @staticmethod
    def _sharded_projected_adam(
        state, slots, grads, lay: Layout, eps: float, scale: float, rounding_seed: int | None
    ) -> None:
        """The projected Adam step of row-sharded parameters (one shape, side and group): the right
        side is the fused kernel on each rank's rows (``R = G Q`` has the gradient's rows); the left
        side needs ``R = Q^T G``, a sum over the ranks: one reduce-scatter of every ``r x n`` of the
        bucket leaves each rank the columns of ``R`` whose moments it keeps (``col_range``), Adam
        there, then one all-gather of the Adam directions ``N`` (and of ``R`` with a residual) gives
        every rank its rows of ``Q N``: the reference's arithmetic
        (``lorenza_kernels/reference/projected_adam.py``), with the same traffic as an all-reduce
        of ``R`` and the moments split over the ranks."""
        group = slots[0].group
        beta1, beta2 = (float(b) for b in group["betas"])
        lr, wd = float(group["lr"]), float(group["weight_decay"])
        rscale = float(group.get("residual_scale", 0.0))
        states = [state[s.param] for s in slots]
        loc = _sharding.local
        if lay.side == "right":
            params = [s.data for s in slots]
            lk.projected_adam_step_batched_(
                params, [g.contiguous() for g in grads], [loc(st["proj"]) for st in states],
                [loc(st["exp_avg"]) for st in states], [loc(st["exp_avg_sq"]) for st in states],
                step=[st["step"] for st in states], lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=wd,
                scale=scale, side="right", residual_scale=rscale, rounding_seed=rounding_seed,
                rounding_streams=[s.stream for s in slots] if rounding_seed is not None else None,
                rounding_offsets=[s.offset for s in slots] if rounding_seed is not None else None,
            )  # fmt: skip
            return
        G = [g.reshape(-1, lay.n).float() for g in grads]
        Q = [loc(st["proj"]).float() for st in states]
        ranks = slots[0].shard.group  # the process group (``group`` above is the parameter group)
        R_cols = _sharding.reduce_scatter_cols([q.mT @ g for q, g in zip(Q, G)], ranks)
        N_cols = []
        for st, r in zip(states, R_cols):
            M, V = loc(st["exp_avg"]), loc(st["exp_avg_sq"])
            M.lerp_(r, 1.0 - beta1)
            V.mul_(beta2).addcmul_(r, r, value=1.0 - beta2)
            bc1, bc2 = 1.0 - beta1 ** st["step"], 1.0 - beta2 ** st["step"]
            N_cols.append((M / bc1) / (V.sqrt() / bc2**0.5 + eps))
        wanted = N_cols + (R_cols if rscale != 0.0 else [])
        full = _sharding.all_gather_cols(wanted, [lay.n] * len(wanted), ranks)
        Ns, Rs = full[: len(slots)], full[len(slots) :] or [None] * len(slots)
        work, writes = [], []
        for s, q, g, N, r in zip(slots, Q, G, Ns, Rs):
            W = s.data.reshape(-1, lay.n)
            W32 = W.float() if W.dtype != torch.float32 else W
            W32.mul_(1.0 - lr * wd)
            W32.add_(q @ N, alpha=-lr * scale)
            if rscale != 0.0:
                W32.add_(g - q @ r, alpha=-lr * rscale)
            if W32 is not W:
                work.append(W32)
                writes.append(s)
        if not writes:
            return
        if rounding_seed is not None:
            lk.stochastic_round_(
                [s.data.view(-1, lay.n) for s in writes], work, rounding_seed, streams=[s.stream for s in writes],
                offsets=[s.offset for s in writes],
            )  # fmt: skip
        else:
            for s, w in zip(writes, work):
                s.data.view(-1, lay.n).copy_(w)

    def state_bytes(self) -> int:
        """Bytes of every tensor of the optimizer's state (the memory table's "optimizer state")."""
        tensors = [  # under FSDP2, this rank's
            _sharding.local(v)
            for st in self._owner().state.values()
            for v in st.values()
            if isinstance(v, torch.Tensor)
        ]
        return sum(v.numel() * v.element_size() for v in tensors)


#: LORENZA's probe spaces: "singular" (the paper's, P = U diag(u) V^T with the gradient's
#: leading singular vectors) and "subspace" (P = Q U with U of R's shape).
PROBE_SPACES = ("singular", "subspace")


class SubspaceNoise:
    """LORENZA's probes: dense slots as :class:`~lorenza.optim._noise.DenseNoise`; a projected slot:

    - ``space="singular"`` (default): ``P = U diag(u) V^T`` with ``U``, ``V`` the rank-``r`` left
      and right singular vectors of the refresh gradient (the basis ``Q`` is one of them, the state's
      ``factor`` the other) and ``u`` **r numbers** from ``(seed, stream)``: the probe lies in the
      span of the gradient's leading rank-one components; ``||P||^2 = ||u||^2``;
    - ``space="subspace"``: ``P = Q U`` (left) or ``U Q^T`` (right), ``U`` of ``R``'s shape
      (``r max(m, n)`` numbers); ``||P||^2 = ||U||^2``.

    A projected slot without its factors yet is not probed (``||P||^2 = 0``). The random numbers of
    one application come from one ``seeded_axpby_`` call per bucket of matrices
    (``_functional.BUCKET_NUMEL`` numbers), which also returns ``||P||^2``; each product is an
    in-place rank-``r`` ``addmm_`` (never an ``m x n`` temporary), in the parameter's dtype: for
    bfloat16/float16 parameters the factors are rounded to it.
    """

    def __init__(self, subspace: Subspace, plan: SubspacePlan, space: str = "singular"):
        self.subspace, self.plan, self.space = subspace, plan, space

    def apply_(
        self,
        slots: Sequence[Slot],
        seed: int,
        alpha: Sequence[float],
        beta: float | Sequence[float] = 1.0,
        *,
        out: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        n = len(slots)
        alphas = list(alpha)
        betas = [float(beta)] * n if isinstance(beta, (int, float)) else list(beta)
        # a sharded slot's target: its rows (in place), or the whole all-gathered parameter (an
        # exact probe's copy, ``_noise.ProbeTargets``)
        targets = [s.data for s in slots] if out is None else list(out)
        whole = [s.shard is None or t.numel() == s.param.numel() for s, t in zip(slots, targets)]
        dense, projected = self._split(slots)
        device = slots[0].param.device if n else torch.device("cpu")
        norms = torch.zeros(n, dtype=torch.float32, device=device)
        if dense:
            offsets = [0 if whole[k] else slots[k].offset for k in dense]
            sq = seeded_axpby_slots_(
                [targets[k] for k in dense], [slots[k].stream for k in dense], seed,
                [alphas[k] for k in dense], [betas[k] for k in dense], offsets=offsets if any(offsets) else None,
            )  # fmt: skip
            norms[dense] = sq.to(device)
        state = self.subspace._owner().state
        layouts = self.plan.layouts
        for part, noise, sq in self._noise(slots, projected, seed):
            norms[part] = sq.to(device)  # U is generated whole on every rank: a whole norm
            for k, u in zip(part, noise):
                st = state[slots[k].param]
                lay = layouts[slots[k].index]
                left, right = self._factors(st, lay, u, slots[k].shard, whole[k])
                self._add_product(targets[k], left, right, lay, alphas[k], betas[k])
        return norms

    def partial(self, slots: Sequence[Slot]) -> list[bool]:
        """Sharded dense slots' norms are this rank's part; a projected slot's ``U`` is whole."""
        layouts = self.plan.layouts
        return [s.shard is not None and layouts[s.index] is None for s in slots]

    def norms(self, slots: Sequence[Slot], seed: int) -> torch.Tensor:
        n = len(slots)
        dense, projected = self._split(slots)
        device = slots[0].param.device if n else torch.device("cpu")
        norms = torch.zeros(n, dtype=torch.float32, device=device)
        if dense:
            norms[dense] = DenseNoise().norms([slots[k] for k in dense], seed).to(device)
        for part, _, sq in self._noise(slots, projected, seed):
            norms[part] = sq.to(device)
        return norms

    def _split(self, slots: Sequence[Slot]) -> tuple[list[int], list[int]]:
        """Dense slots, and projected slots that have their factors (the others are not probed)."""
        layouts = self.plan.layouts
        state = self.subspace._owner().state
        need = "factor" if self.space == "singular" else "proj"
        dense = [k for k, s in enumerate(slots) if layouts[s.index] is None]
        projected = [k for k, s in enumerate(slots) if layouts[s.index] is not None and need in state.get(s.param, {})]
        return dense, projected

    def _noise(self, slots: Sequence[Slot], projected: list[int], seed: int):
        """``(positions, noise tensors, ||noise||^2)`` per bucket of projected slots: one kernel call
        each; the noise is ``u`` (r numbers) or ``U`` (``R``'s shape)."""
        layouts = self.plan.layouts
        if self.space == "singular":
            shapes = [(layouts[slots[k].index].rank,) for k in projected]
        else:
            shapes = [layouts[slots[k].index].moment_shape for k in projected]
        for idx in buckets(len(projected), [math.prod(sh) for sh in shapes]):
            part = [projected[i] for i in idx]
            us = [torch.empty(shapes[i], dtype=torch.float32, device=slots[projected[i]].param.device) for i in idx]
            sq = seeded_axpby_slots_(us, [slots[k].stream for k in part], seed, 1.0, 0.0)
            yield part, us, sq

    def _factors(
        self, st: dict, lay: Layout, u: torch.Tensor, shard: Any = None, whole: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(L, M)`` with ``P = L M^T``: ``L`` is ``m x r`` (a sharded target's rows of it), ``M``
        is ``n x r``."""
        Q = st["proj"]
        if shard is not None:  # FSDP2: the m x r factor's rows are sharded, gathered for a whole target
            Q = _sharding.local(Q)

            def rows_of(X: torch.Tensor, sharded: bool) -> torch.Tensor:
                if sharded:  # this rank's rows: all of them gathered for a whole target
                    return _sharding.gather_full(X, shard, (lay.m, lay.rank)) if whole else X
                return X if whole else X[shard.row0 : shard.row0 + shard.local.shape[0]]

            if self.space == "singular":  # right: Q = V (whole), F = U (rows); left: Q = U (rows), F = V
                F = _sharding.local(st["factor"])
                return (rows_of(F, True) * u, Q) if lay.side == "right" else (rows_of(Q, True) * u, F)
            if lay.side == "left":  # P = Q U: Q's rows
                return rows_of(Q, True), u.t()
            return rows_of(u, False), Q  # P = U Q^T: U drawn whole, its rows
        if self.space == "singular":
            F = st["factor"]
            # right side: Q = V (n x r), F = U (m x r); left side: Q = U, F = V
            return (F * u, Q) if lay.side == "right" else (Q * u, F)
        # P = Q U (left: Q m x r, U r x n) or U Q^T (right: U m x r, Q n x r)
        return (u, Q) if lay.side == "right" else (Q, u.t())

    @staticmethod
    def _add_product(
        target: torch.Tensor, left: torch.Tensor, right: torch.Tensor, lay: Layout, alpha: float, beta: float
    ) -> None:
        """``W <- beta W + alpha left right^T`` in place on the ``m x n`` view of ``target``."""
        p = target.detach()
        work = p if p.is_contiguous() else p.contiguous()
        W = work.view(-1, lay.n)  # m x n, or a shard's rows
        if W.dtype != left.dtype:
            left, right = left.to(W.dtype), right.to(W.dtype)
        W.addmm_(left, right.t(), beta=beta, alpha=alpha)
        if work is not p:
            p.copy_(work)
