"""The base class of every seeded optimizer of :mod:`lorenza.optim`.

How an optimizer is put together (``docs/algorithms.md`` has the mathematics):

* **The arithmetic** is free functions over lists of tensors (``_functional.py``: AdamW and
  galore-torch's AdamW as multi-tensor updates; ``lorenza_kernels``' seeded, projected-Adam and
  randomized-SVD ops), so a step makes O(1) calls whatever the number of layers.
* **This class** owns what every optimizer shares: parameter groups with per-group hyperparameters
  checked on construction, in ``add_param_group`` and at every step (a scheduler or a user may edit
  a group); fixed streams and per-step seeds; the global state and ``state_dict``; skips; the
  rank-averaged probe losses; two-sided probes.
* **Components**, held rather than mixed in: a noise object (``_noise.DenseNoise``, or
  ``_subspace.SubspaceNoise`` for LORENZA's subspace probes) that applies and removes probes, the
  :class:`~lorenza.optim._backward.GradientPass` that runs the one backward pass (normal or
  per-layer), and for the low-rank optimizers the ``_subspace.Subspace`` that owns the bases.
* **Hooks** a subclass implements, each receiving the step's context (a :class:`StepContext`:
  step number, slots, noise, subspace plan) as an argument, so that nothing mid-step lives on the
  optimizer: ``step(closure)`` (the algorithm), :meth:`_context` (what a step knows; the low-rank
  optimizers add their plan) and, for the optimizers that take a gradient, :meth:`_update`
  (``ctx, slots, grads``: one call for all parameters in normal mode, one per parameter in
  per-layer mode).

Streams and seeds (``docs/rng.md``): every parameter has a fixed stream, its position in the
optimizer's parameter order across groups (frozen parameters keep their number but are skipped).
The noise of probe ``j`` of step ``t`` is drawn with seed ``probe_seed(seed, t, j)``
(:mod:`._seeds`); noise that is not a probe (a randomized-SVD sketch) uses
``probe_seed(seed, t, RESERVED_PROBE_BASE + k)``.

Global state ``self._global``: ``seed``, ``step`` (steps attempted, the noise counter),
``skipped`` (steps skipped for non-finite values) and the structural options of the subclass
(``num_probes``, ``num_queries``, ...). ``state_dict()`` stores it under the key ``"lorenza"``;
``load_state_dict`` restores it and keeps the saved dtype of every state tensor (torch would cast
float32 moments to a bfloat16 parameter's dtype). Per-parameter state lives in ``self.state[p]``.

Skips: :meth:`_skip` counts a skipped step and warns once per optimizer. A skipped step removes
the perturbations by regenerating and subtracting the noise: the parameters are those before the
step up to the rounding of that addition and subtraction (bitwise would need a copy of the
parameters, which the memory table excludes); the state is untouched.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

import lorenza_kernels as lk
from lorenza_kernels import _registry

from . import _checks, _sharding
from ._backward import GradientPass, LayerPass
from ._noise import DenseNoise, Noise, Perturbation, ProbeTargets, Slot
from ._seeds import rounding_seed
from .closure import as_loss

__all__ = ["SeededOptimizer", "StepContext"]


def _fused_linear(ctx: StepContext, seed: int, alphas: Sequence[float], slots: dict[int, Slot]) -> Callable | None:
    """``F.linear`` of a perturbed weight through ``lorenza_kernels.seeded_linear`` (noise generated
    inside the GEMM), where that op has a fast kernel for the weight's device (Triton on CUDA) and
    the probe is one dense term with one ``alpha`` for weight and bias; None otherwise (the
    perturbed copy is made instead). ``slots``: the probe's targets (``ProbeTargets.by_id``)."""
    if not isinstance(ctx.noise, DenseNoise):
        return None

    def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
        if _registry.active("seeded_linear", weight.device.type) == "reference" or x.dtype != weight.dtype:
            return None
        w = slots[id(weight)]
        b = slots.get(id(bias)) if bias is not None else None
        if _sharding.is_dtensor(weight) or (bias is not None and _sharding.is_dtensor(bias)):
            return None  # a DTensor read as itself: the perturbed copy is made instead
        if w.param.dim() != 2 or (b is not None and alphas[b.index] != alphas[w.index]):
            return None
        return lk.seeded_linear(
            x, weight.detach(), None if bias is None else bias.detach(), seed=seed, alpha=alphas[w.index],
            weight_stream=w.stream, bias_stream=None if b is None else b.stream,
        )  # fmt: skip

    return linear


_STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the seeded kernels write these
PROBES = ("exact", "inplace")


@dataclass
class StepContext:
    """What one step knows, handed to every hook: nothing of a step is kept on the optimizer."""

    step: int
    slots: list[Slot]
    noise: Noise
    plan: Any = None  # the subspace plan of the low-rank optimizers (``_subspace.SubspacePlan``)


class SeededOptimizer(torch.optim.Optimizer):
    """Base class: see the module docstring. Subclasses set ``group_checks`` and ``global_checks``,
    call ``super().__init__(params, defaults, seed=..., options={...})`` and implement ``step``
    (and :meth:`_update` when they take a gradient)."""

    #: per-group option -> check(name, value); every key of ``defaults`` should have one.
    group_checks: ClassVar[dict[str, _checks.Check]] = {
        "lr": _checks.non_negative,
        "weight_decay": _checks.non_negative,
        "stochastic_rounding": _checks.boolean,
    }
    #: global option -> minimum integer value (``num_probes``: 1, ``num_queries``: 2).
    global_checks: ClassVar[dict[str, int]] = {}
    #: parameter dtypes the seeded kernels accept.
    param_dtypes: ClassVar[tuple[torch.dtype, ...]] = (torch.float32, torch.bfloat16, torch.float16)
    #: group keys that torch, schedulers or users add and that are no hyperparameter.
    extra_group_keys: ClassVar[frozenset[str]] = frozenset({"params", "param_names", "name", "initial_lr"})
    #: None when FSDP2's sharded parameters are supported, else why not (the error at construction).
    sharded_refusal: ClassVar[str | None] = None

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        *,
        seed: int = 0,
        per_layer: bool = False,
        state_dtype: torch.dtype | None = torch.float32,
        options: dict[str, int] | None = None,
        probe: str = "exact",
        stochastic_rounding: bool = True,
    ) -> None:
        seed = _checks.seed("seed", seed)
        defaults = {**defaults, "stochastic_rounding": stochastic_rounding}
        _checks.boolean("per_layer", per_layer)
        _checks.choice("probe", probe, PROBES)
        _checks.dtype_or_none("state_dtype", state_dtype, _STATE_DTYPES)
        for key, value in defaults.items():
            self.group_checks[key](key, value)
        options = dict(options or {})
        for key, value in options.items():
            _checks.int_at_least(key, value, self.global_checks[key])
        self._global: dict[str, Any] = {"format": 1, "seed": seed, "step": 0, "skipped": 0, **options}
        self.per_layer = per_layer
        self.state_dtype = state_dtype
        #: "exact": probes never write the parameters (``_probe.py``); "inplace": add, evaluate, subtract.
        self.probe = probe
        #: process group whose ranks average the probe losses (None: the default group).
        self.process_group = None
        self._gradient_pass = GradientPass(self)
        self._warned_skip = False
        _checks.per_layer_alone(self)
        super().__init__(params, defaults)

    # --- groups -------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group: expected a dict, got {type(param_group).__name__}")
        unknown = sorted(set(param_group) - set(self.defaults) - self.extra_group_keys)
        if unknown:
            raise ValueError(
                f"param_group: unknown option(s) {unknown}; {type(self).__name__} takes {sorted(self.defaults)}"
            )
        for key, value in param_group.items():
            if key in self.group_checks:
                self.group_checks[key](key, value)
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif params is not None and not isinstance(params, set):
            params = list(params)
            param_group["params"] = params
        for k, p in enumerate(params if isinstance(params, list) else []):
            t = p[1] if isinstance(p, tuple) else p
            _checks.not_sharded(type(self).__name__, k, t)
            if self.sharded_refusal is not None and _sharding.is_dtensor(t):
                raise TypeError(
                    f"params[{k}]: a DTensor (FSDP2's fully_shard) is not supported by {type(self).__name__} yet: "
                    f"{self.sharded_refusal}; use DistributedDataParallel, or MeZO, MeZOAdam, Loren or AdaZoSAM "
                    "(docs/algorithms.md, 'Distributed training')"
                )
            if self.per_layer and _sharding.is_dtensor(t):
                raise ValueError(
                    f"per_layer: True is not supported with sharded parameters (params[{k}] is a DTensor, FSDP2's "
                    "fully_shard): FSDP2 sets the sharded gradient after its reduce-scatter, not through the "
                    "gradient hooks per-layer mode updates in; use per_layer=False"
                )
            if isinstance(t, torch.Tensor) and t.dtype not in self.param_dtypes:
                names = ", ".join(str(d).replace("torch.", "") for d in self.param_dtypes)
                raise TypeError(f"params[{k}]: dtype {str(t.dtype).replace('torch.', '')} is not supported ({names})")
        if isinstance(params, list) and len({id(p[1] if isinstance(p, tuple) else p) for p in params}) != len(params):
            raise ValueError("params: a parameter appears twice (it would own two noise streams)")
        super().add_param_group(param_group)
        if self.per_layer:
            self._gradient_pass.install(self.param_groups[-1]["params"])
        if "rank" in self.defaults:
            self._warn_dense_fallback(len(self.param_groups) - 1)

    def _warn_dense_fallback(self, g: int) -> None:
        """Once per optimizer: the parameters of a group with a ``rank`` that are updated densely (a
        1-D parameter, or ``rank >= min(m, n)``: ``lorenza/optim/_subspace.py``), each named."""
        group = self.param_groups[g]
        rank = group.get("rank")
        if rank is None or getattr(self, "_warned_dense", False):
            return
        dense = []
        for k, p in enumerate(group["params"]):
            if p.dim() < 2:
                dense.append(f"param_groups[{g}]['params'][{k}] of shape {tuple(p.shape)} (fewer than 2 dimensions)")
            else:
                m, n = p.shape[0], p.numel() // max(1, p.shape[0])
                if rank >= min(m, n):
                    dense.append(
                        f"param_groups[{g}]['params'][{k}] of shape {tuple(p.shape)} (rank {rank} >= {min(m, n)})"
                    )
        if dense:
            self._warned_dense = True
            more = f" and {len(dense) - 5} more" if len(dense) > 5 else ""
            warnings.warn(
                f"{type(self).__name__}: {len(dense)} parameter(s) of a group with a rank are updated by dense "
                f"AdamW, not in a subspace: {'; '.join(dense[:5])}{more}. Put them in a group with rank=None to "
                "silence this warning (lorenza.optim.param_groups does).",
                UserWarning,
                stacklevel=4,
            )

    def _check_groups(self) -> None:
        for group in self.param_groups:
            for key in self.defaults:
                if key in self.group_checks and key in group:
                    self.group_checks[key](key, group[key])

    def _slots(self) -> list[Slot]:
        """The parameters that require grad, with their fixed streams, in parameter order."""
        slots, stream = [], 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    slots.append(Slot(p, stream, group, len(slots), _sharding.shard_of(p)))
                stream += 1
        if not slots and not getattr(self, "_warned_frozen", False):
            self._warned_frozen = True
            warnings.warn(
                f"{type(self).__name__}: no parameter requires grad (all frozen?): steps evaluate the closure "
                "and change nothing",
                UserWarning,
                stacklevel=3,
            )
        return slots

    # --- global state -------------------------------------------------------------------------

    @property
    def seed(self) -> int:
        return self._global["seed"]

    @property
    def global_step(self) -> int:
        """Steps attempted so far (skipped ones included): the step ``t`` of the last noise drawn."""
        return self._global["step"]

    @property
    def skipped_steps(self) -> int:
        return self._global["skipped"]

    def state_dict(self) -> dict[str, Any]:
        """torch's layout plus a ``"lorenza"`` entry. Under FSDP2 each rank's state tensors are
        ``DTensor``s laid out like their parameters (:meth:`full_state_dict` gathers them)."""
        sd = super().state_dict()
        sd["lorenza"] = dict(self._global)
        return sd

    def full_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with every ``DTensor`` gathered into a whole tensor: the state dict
        of one process on the unsharded model, to save from one rank and load with any number of
        ranks (one included). A collective under FSDP2: every rank must call it. A snapshot: its
        tensors are copies (``state_dict()``'s are the live state, as in torch)."""
        sd = self.state_dict()
        sd["state"] = {
            key: {
                k: v.full_tensor() if _sharding.is_dtensor(v) else v.clone() if isinstance(v, torch.Tensor) else v
                for k, v in value.items()
            }
            for key, value in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load groups, per-parameter state (dtypes kept, tensors copied to the parameters' devices)
        and the global state (seed, step, skip counter, options). For FSDP2's sharded parameters a
        whole state tensor of the parameter's shape (from :meth:`full_state_dict`, or one process)
        is cut to this rank's rows and kept as a ``DTensor`` like the parameter; a ``DTensor`` (this
        world size's :meth:`state_dict`) is kept as saved."""
        sd = dict(state_dict)
        glob = sd.pop("lorenza", None)
        if not isinstance(glob, dict):
            raise ValueError(
                "state_dict: no 'lorenza' entry (seed, step counter); was it saved by a lorenza optimizer?"
            )
        _checks.seed("state_dict['lorenza']['seed']", glob.get("seed"))
        for key, low in self.global_checks.items():
            _checks.int_at_least(f"state_dict['lorenza'][{key!r}]", glob.get(key), low)
        saved_state = sd.get("state", {})
        super().load_state_dict({**sd, "state": {}})
        self._check_groups()
        ids = (i for g in sd["param_groups"] for i in g["params"])
        id_map = dict(zip(ids, (p for g in self.param_groups for p in g["params"])))
        for key, value in saved_state.items():
            param = id_map.get(key)
            if param is None:
                raise ValueError(f"state_dict: state for parameter {key!r}, which no parameter group lists")
            self.state[param] = {
                k: _sharding.shard_like(
                    v.detach().to(param.device, copy=True), param, self._row_split(param, k, v, value)
                )
                if isinstance(v, torch.Tensor)
                else v
                for k, v in value.items()
            }
        self._global = dict(glob)

    def _row_split(self, param: torch.Tensor, key: str, value: torch.Tensor, entry: dict) -> bool | str:
        """Whether the whole state tensor ``entry[key]`` of a parameter is split by rows like the
        parameter under FSDP2 (each rank keeping its rows, :func:`_sharding.shard_like`): here the
        tensors of the parameter's shape (moments, LOREN's momentum and the ``a`` of a vector).
        The low-rank optimizers may also answer ``"cols"`` (``_subspace.row_split``)."""
        return value.dim() > 0 and value.shape == param.shape

    def __getstate__(self) -> dict[str, Any]:
        st = super().__getstate__()
        st.update(_global=self._global, per_layer=self.per_layer, state_dtype=self.state_dtype, probe=self.probe)
        st.pop("_gradient_pass", None)  # hooks and weak references do not travel
        return st

    def remove_hooks(self) -> None:
        """Remove the per-layer hooks (the optimizer then works in normal mode)."""
        self._gradient_pass.remove()
        self.per_layer = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        full = "_global" in state
        if full:
            state.setdefault("probe", "inplace")  # pickled before the option existed
        super().__setstate__(state)
        if full:  # unpickled or deep-copied: rebuild what cannot travel
            self.process_group, self._warned_skip = None, False
            self._gradient_pass = GradientPass(self)
            if self.per_layer:
                for group in self.param_groups:
                    self._gradient_pass.install(group["params"])

    # --- skips and checks ---------------------------------------------------------------------

    def _skip(self, reason: str) -> None:
        self._global["skipped"] += 1
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                f"{type(self).__name__}: step {self._global['step'] + 1} skipped: {reason}. The perturbations are "
                "removed and no update is applied; later skips are counted in `skipped_steps` without a warning.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _require_closure(self, closure: Callable[[], Any] | None) -> Callable[[], Any]:
        if closure is None:
            raise TypeError(
                f"closure: {type(self).__name__}.step needs a closure that returns the loss of the current "
                "minibatch (see lorenza.optim.make_closure)"
            )
        if not callable(closure):
            raise TypeError(f"closure: expected a callable, got {type(closure).__name__}")
        self._check_groups()
        return closure

    # --- hooks ----------------------------------------------------------------------------------

    def _rounding_seed(self, step: int, k: int = 0) -> int:
        """The rounding seed of write pass ``k`` of ``step`` (``_seeds.rounding_seed``)."""
        return rounding_seed(self.seed, step, k)

    def _context(self, step: int) -> StepContext:
        """The context of step ``step``: the trainable parameters with their streams, the noise."""
        return StepContext(step, self._slots(), DenseNoise())

    def _update(self, ctx: StepContext, slots: Sequence[Slot], grads: Sequence[torch.Tensor]) -> None:
        """Update ``slots`` from their gradients (after their perturbation is removed)."""
        raise NotImplementedError(f"{type(self).__name__} takes no gradient")

    def _open_layer_pass(self) -> LayerPass | None:
        """Per-layer mode, a gradient arrived outside a pass the optimizer opened: None ignores it
        (GaLore-AdamW opens a step there, its updates driven by the user's backward pass)."""
        return None

    # --- probes ---------------------------------------------------------------------------------

    def _probe_loss(self, closure: Callable[[], Any], slots: Sequence[Slot] = ()) -> torch.Tensor:
        _sharding.resync([s.param for s in slots if s.shard is not None])  # FSDP2 gathers what was written
        with torch.no_grad():
            return as_loss(closure())

    def _reduce(
        self,
        losses: Sequence[torch.Tensor],
        extra: torch.Tensor | None = None,
        summed: Sequence[bool] | None = None,
        group: Any = None,
    ) -> tuple[list[float], list[float]]:
        """Probe losses averaged over the ranks (one all-reduce) and ``extra`` values: untouched, or,
        where ``summed`` is True (partial sums of sharded parameters), summed over the ranks of the
        shards' ``group`` in the same all-reduce when it is the losses' group. All brought to the host
        in one synchronisation."""
        vals = torch.stack([v.to(losses[0].device, torch.float64) for v in losses])
        nl = len(losses)
        if extra is not None and extra.numel():
            vals = torch.cat([vals, extra.detach().to(vals.device, torch.float64).reshape(-1)])
        if dist.is_available() and dist.is_initialized():
            world = dist.get_world_size(self.process_group)
            mask = [False] * (vals.numel() - nl) if summed is None else list(summed)
            if any(mask) and group is not None and group is not self.process_group and group != self.process_group:
                idx = [nl + k for k, m in enumerate(mask) if m]
                part = vals[idx].clone()
                dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
                vals[idx] = part
                mask = [False] * len(mask)
            if world > 1:
                keep = torch.tensor([k for k, m in enumerate(mask) if not m], dtype=torch.long) + nl
                saved = vals[keep].clone() if keep.numel() else None
                dist.all_reduce(vals, op=dist.ReduceOp.SUM, group=self.process_group)
                vals[:nl] /= world
                if saved is not None:
                    vals[keep] = saved
        out = vals.tolist()
        return out[:nl], out[nl:]

    def _perturbation(self, ctx: StepContext) -> Perturbation:
        """An empty record of the step's ascent, exact or in place as ``probe`` says."""
        return Perturbation(ctx.noise, ctx.slots, exact=self.probe == "exact")

    def _two_sided_probes(
        self,
        ctx: StepContext,
        closure: Callable[[], Any],
        seeds: Sequence[int],
        mus: Sequence[float],
        need_norms: bool = True,
    ) -> tuple[list[float], list[list[float]], bool]:
        """``(losses, norms, ok)``: ``[L(p + mu P_0), L(p - mu P_0), L(p + mu P_1), ...]`` (rank-averaged),
        ``||P_j||^2`` per probe and slot (zeros when not ``need_norms``: exact probes may then skip
        their computation), and whether every loss is finite.

        ``probe="exact"``: the parameters are never written (the losses are evaluated inside a
        :class:`~lorenza.optim._probe.ProbeMode`). ``probe="inplace"``: when ``ok``, the parameters
        are left at ``p - mu P_last`` (the caller fuses the last restore with its update; see
        :attr:`left_at`); otherwise they are restored and the skip counted. If the closure raises,
        the perturbation in place is removed before the exception propagates.
        """
        if self.probe == "exact":
            return self._exact_probes(ctx, closure, seeds, mus, need_norms)
        slots, noise = ctx.slots, ctx.noise
        losses: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        applied: tuple[int, list[float]] | None = None
        down = [-2.0 * m for m in mus]
        try:
            for j, seed in enumerate(seeds):
                norms.append(noise.apply_(slots, seed, mus))
                applied = (seed, list(mus))
                losses.append(self._probe_loss(closure, slots))
                noise.apply_(slots, seed, down)
                applied = (seed, [-m for m in mus])
                losses.append(self._probe_loss(closure, slots))
                if j + 1 < len(seeds):
                    noise.apply_(slots, seed, mus)
                    applied = None
        except BaseException:
            if applied is not None:
                noise.apply_(slots, applied[0], [-a for a in applied[1]])
            raise
        vals, norms_per_probe, ok = self._finish_probes(slots, losses, norms, noise)
        if not ok:
            noise.apply_(slots, seeds[-1], mus)
        return vals, norms_per_probe, ok

    def _exact_probes(
        self,
        ctx: StepContext,
        closure: Callable[[], Any],
        seeds: Sequence[int],
        mus: Sequence[float],
        need_norms: bool = True,
    ) -> tuple[list[float], list[list[float]], bool]:
        slots = ctx.slots
        losses: list[torch.Tensor] = []
        norms: list[torch.Tensor] = []
        for seed in seeds:
            recorded: dict[int, torch.Tensor] = {}
            for sign in (1.0, -1.0):
                alphas = [sign * m for m in mus]
                probe = Perturbation(ctx.noise, slots, exact=True)
                probe.add(seed, alphas)
                targets = ProbeTargets(slots)
                make = probe.materializer(recorded if sign > 0 else None)
                linear = _fused_linear(ctx, seed, alphas, targets.by_id)
                with targets.mode(make, linear=linear):
                    losses.append(self._probe_loss(closure, slots))
            if not need_norms:
                norms.append(torch.zeros(len(slots)))
                continue
            # parameters the loss did not read, or a fused kernel read, and sharded ones (whose norms
            # are summed over their shards): norms from the stream
            missing = [s for s in slots if s.index not in recorded]
            if missing:
                for s, sq in zip(missing, ctx.noise.norms(missing, seed)):
                    recorded[s.index] = sq.reshape(1)
            device = slots[0].param.device if slots else torch.device("cpu")
            norms.append(
                torch.cat([recorded[s.index].reshape(1).to(device) for s in slots]) if slots else torch.zeros(0)
            )
        return self._finish_probes(slots, losses, norms, ctx.noise)

    def _finish_probes(self, slots, losses, norms, noise=None) -> tuple[list[float], list[list[float]], bool]:
        summed = None
        group = None
        sharded = [s for s in slots if s.shard is not None]
        if sharded and noise is not None:
            summed = noise.partial(slots) * len(norms)
            group = sharded[0].shard.group
        vals, flat = self._reduce(losses, torch.cat(norms) if slots else None, summed, group)
        n = len(slots)
        norms_per_probe = [flat[j * n : (j + 1) * n] for j in range(len(norms))]
        if not all(math.isfinite(v) for v in vals):
            self._skip(f"non-finite loss in a zeroth-order probe ({vals})")
            return vals, norms_per_probe, False
        return vals, norms_per_probe, True

    def left_at(self, mus: Sequence[float]) -> list[float]:
        """Where two-sided probes leave the parameters, as the coefficient of the last probe's
        noise: ``-mu`` in place, ``0`` with exact probes."""
        return [-m for m in mus] if self.probe == "inplace" else [0.0] * len(mus)
