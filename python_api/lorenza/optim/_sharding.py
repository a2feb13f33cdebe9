"""Sharded parameters (FSDP2's ``fully_shard``): each rank works on its shard with global indices.

FSDP2 (https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html) replaces every
parameter by a ``DTensor`` sharded on dim 0 over a 1-D device mesh (``Shard(0)``): rank ``w`` holds
rows ``[w c, (w + 1) c)`` of the ``m x n`` view, ``c = ceil(m / world)`` (the last ranks may hold
fewer rows, or none). A row shard is the contiguous range ``[start, start + local numel)`` of the
full tensor's flat index, so the noise and the rounding words of the shard are the kernels' with
``offsets=[start]`` (``docs/rng.md``, "Streams in the kernels"): every rank perturbs and updates only
its shard, and the union is exactly the update of the unsharded tensor.

What this module provides (``docs/algorithms.md``, "Distributed training"):

* :class:`ShardInfo` / :func:`shard_of`: the local tensor, its flat offset and first row, the
  global shape, and the mesh's process group, for a supported DTensor (``Shard(0)`` on a 1-D mesh);
  :func:`check_param` refuses the other placements with an error naming them, and DTensors that no
  FSDP2 module manages (``distribute_tensor``).
* :func:`local`: the local tensor of a DTensor (state and gradients included), the tensor itself
  otherwise. The optimizers compute on local tensors and keep their state as DTensors laid out
  like the parameter (for ``torch.distributed.checkpoint``).
* FSDP2's unsharded parameters (:func:`fsdp_param`, :func:`unsharded_alias`): inside the forward,
  modules read the all-gathered ``_unsharded_param``, not the DTensor the optimizer holds; exact
  probes perturb that tensor where it is read (``_probe.py``).
* :func:`resync`: after the optimizer writes shards in place (in-place probes, updates), FSDP2
  groups that still hold an all-gathered copy (the root keeps its parameters unsharded after
  forward) are resharded so that the next forward gathers the new values.
* Small collectives: :func:`all_reduce_`, :func:`all_gather_rows`, :func:`reduce_scatter_cols`,
  :func:`all_gather_cols`.

FSDP2's internals (``FSDPState._fsdp_param_groups``, ``FSDPParam._unsharded_param``) are read
through ``torch.distributed._composable_state``; they are private torch APIs, checked on use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

__all__ = [
    "ShardInfo",
    "all_gather_cols",
    "all_gather_rows",
    "all_reduce_",
    "check_param",
    "col_range",
    "fsdp_param",
    "gather_full",
    "is_dtensor",
    "local",
    "resync",
    "shard_of",
    "shard_like",
    "sharded_like",
    "unsharded_alias",
]

try:  # torch built without distributed has no DTensor
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]
    Shard = None  # type: ignore[assignment,misc]


class ShardInfo(NamedTuple):
    """A rank's row shard of a parameter: ``local`` is rows ``[row0, row0 + local rows)`` of the
    global ``m x n`` view (``shape[0] x rest``; a 1-D tensor is split along its only dimension,
    then ``row0`` counts elements), starting at flat element ``offset``."""

    local: torch.Tensor
    offset: int
    row0: int
    shape: torch.Size
    group: Any  # the mesh's ProcessGroup
    world: int
    rank: int


def is_dtensor(t: Any) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: Any) -> Any:
    """The local tensor of a DTensor (its storage, written in place by the kernels), else ``t``."""
    if DTensor is not None and isinstance(t, DTensor):
        return t._local_tensor
    return t


def check_param(name: str, optimizer_name: str, t: Any) -> None:
    """Refuse DTensors other than FSDP2's ``Shard(0)`` over a 1-D mesh, naming the placement."""
    if not is_dtensor(t):
        return
    mesh, placements = t.device_mesh, tuple(t.placements)
    if not (mesh.ndim == 1 and len(placements) == 1 and placements[0] == Shard(0)):
        raise TypeError(
            f"{name}: a DTensor with placements {placements} on a {mesh.ndim}-D mesh is not supported by "
            f"{optimizer_name}: sharded parameters must be FSDP2's (fully_shard with the default Shard(0) "
            "placement on a 1-D mesh; no tensor parallelism, no HSDP, no shard_placement_fn); "
            "docs/algorithms.md, 'Distributed training'"
        )
    if fsdp_param(t) is None:
        raise TypeError(
            f"{name}: a DTensor that no FSDP2 module manages (made by distribute_tensor, or the optimizer built "
            f"before fully_shard replaced the parameters) is not supported by {optimizer_name}: build the optimizer "
            "from model.parameters() after fully_shard(model); docs/algorithms.md, 'Distributed training'"
        )


def shard_of(p: Any) -> ShardInfo | None:
    """The :class:`ShardInfo` of a ``Shard(0)`` DTensor, None for a plain tensor."""
    if not is_dtensor(p):
        return None
    mesh = p.device_mesh
    group = mesh.get_group()
    world, rank = mesh.size(), mesh.get_local_rank()
    shape = p.shape
    rows = shape[0] if len(shape) else 1
    chunk = -(-rows // world) if rows else 0
    row0 = min(rank * chunk, rows)
    loc = p._local_tensor
    per_row = math.prod(shape[1:]) if len(shape) >= 2 else 1
    if loc.numel() != (min(row0 + chunk, rows) - row0) * per_row:
        raise RuntimeError(
            f"a DTensor of shape {tuple(shape)} has a local shard of {tuple(loc.shape)} on rank {rank} of {world}, "
            "not the ceil(rows / world) row split of Shard(0) that lorenza.optim assumes"
        )
    return ShardInfo(loc, row0 * per_row, row0, shape, group, world, rank)


def col_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Columns ``[c0, c1)`` of rank ``rank`` when ``n`` columns are split as ``Shard`` does (ceil chunks)."""
    chunk = -(-n // world) if n else 0
    c0 = min(rank * chunk, n)
    return c0, min(c0 + chunk, n)


def sharded_like(full_shape: Sequence[int], loc: torch.Tensor, like: Any, dim: int = 0) -> Any:
    """A DTensor of global shape ``full_shape`` whose local shard (on ``like``'s mesh, ``Shard(dim)``)
    is ``loc`` (kept, not copied): optimizer state laid out like its parameter, for checkpoints."""
    full_shape = torch.Size(full_shape)
    stride = torch.empty(full_shape, device="meta").stride()
    return DTensor.from_local(loc, like.device_mesh, [Shard(dim)], run_check=False, shape=full_shape, stride=stride)


def shard_like(value: torch.Tensor, param: Any, split: bool | str) -> torch.Tensor:
    """A loaded state tensor for ``param``: with ``split`` (the optimizer's rule: True for a tensor
    laid out by the parameter's rows), a whole tensor of a sharded parameter becomes this rank's rows
    of it, as a DTensor on the parameter's mesh (a copy); with ``split="cols"`` (the ``r x n``
    moments of a left-projected matrix) this rank's columns (:func:`col_range`, ``Shard(1)``);
    anything else (a DTensor already, a whole vector such as LOREN's ``a`` of a matrix, a scalar,
    the state of a plain parameter) is returned as is."""
    info = shard_of(param)
    if not split or info is None or is_dtensor(value):
        return value
    if split == "cols":
        if value.dim() != 2:
            raise ValueError(f"state_dict: a state tensor of shape {tuple(value.shape)} cannot be split by columns")
        c0, c1 = col_range(value.shape[1], info.world, info.rank)
        loc = value[:, c0:c1].clone(memory_format=torch.contiguous_format)
        return sharded_like(value.shape, loc, param, dim=1)
    if value.dim() == 0 or value.shape[0] != (info.shape[0] if len(info.shape) else 1):
        raise ValueError(
            f"state_dict: a state tensor of shape {tuple(value.shape)} cannot be split by the rows of a "
            f"{tuple(info.shape)} parameter"
        )
    rows = info.local.shape[0] if info.local.dim() else 0
    loc = value[info.row0 : info.row0 + rows].clone(memory_format=torch.contiguous_format)
    return sharded_like(value.shape, loc, param)


# --- FSDP2's unsharded parameters ---------------------------------------------------------------------


def _fsdp_params() -> dict[int, Any]:
    """id(sharded DTensor parameter) -> its FSDPParam, over every FSDP2 state of the process."""
    from torch.distributed import _composable_state

    out: dict[int, Any] = {}
    for ref in list(_composable_state._module_state_mapping.values()):
        state = ref()
        for group in getattr(state, "_fsdp_param_groups", None) or ():
            for fp in getattr(group, "fsdp_params", ()):
                out[id(fp.sharded_param)] = (fp, group)
    return out


_CACHE: dict[int, Any] = {}


def fsdp_param(p: Any) -> tuple[Any, Any] | None:
    """``(FSDPParam, FSDPParamGroup)`` managing the DTensor parameter ``p``, or None (a DTensor made
    by hand, ``distribute_tensor``, is not managed by FSDP2)."""
    hit = _CACHE.get(id(p))
    if hit is not None and hit[0].sharded_param is p:
        return hit
    _CACHE.clear()
    _CACHE.update(_fsdp_params())
    hit = _CACHE.get(id(p))
    return hit if hit is not None and hit[0].sharded_param is p else None


def unsharded_alias(p: Any) -> torch.Tensor | None:
    """The all-gathered parameter FSDP2 puts on the module during forward and backward (created at
    the first all-gather, then reused), or None when there is none (yet)."""
    hit = fsdp_param(p)
    if hit is None:
        return None
    return getattr(hit[0], "_unsharded_param", None)


def resync(params: Sequence[Any]) -> None:
    """Reshard the FSDP2 groups of ``params`` that hold an all-gathered copy, so that the next
    forward all-gathers the shards the optimizer has just written (FSDP2 keeps the root module's
    parameters unsharded after forward). A no-op for sharded groups and plain tensors."""
    seen: set[int] = set()
    for p in params:
        if not is_dtensor(p):
            continue
        hit = fsdp_param(p)
        if hit is None or id(hit[1]) in seen:
            continue
        seen.add(id(hit[1]))
        group = hit[1]
        if not getattr(group, "is_sharded", True):
            group.reshard()


# --- collectives ----------------------------------------------------------------------------------------


def _all_gather_single(out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
    """``all_gather_single`` (the newer torch's name), else ``all_gather_into_tensor`` (deprecated there)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def all_reduce_(t: torch.Tensor, group: Any) -> torch.Tensor:
    """Sum over the ranks of ``group``, in place (float64 or float32 as given)."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def all_gather_rows(parts: Sequence[torch.Tensor], rows: Sequence[int], group: Any) -> list[torch.Tensor]:
    """The full matrices whose row shards (``Shard(0)``: ceil chunks, padded here) are ``parts``
    (each ``rows_local x w``, float32, one device), gathered in ONE collective."""
    world = dist.get_world_size(group)
    if not parts:
        return []
    device = parts[0].device
    chunks = [-(-m // world) if m else 0 for m in rows]
    widths = [p.shape[1] if p.dim() == 2 else 1 for p in parts]
    sizes = [c * w for c, w in zip(chunks, widths)]
    buf = torch.zeros(sum(sizes), dtype=torch.float32, device=device)
    pos = 0
    for p, s in zip(parts, sizes):
        buf[pos : pos + p.numel()] = p.reshape(-1)
        pos += s
    out = torch.empty(world * sum(sizes), dtype=torch.float32, device=device)
    _all_gather_single(out, buf, group=group)
    out = out.view(world, sum(sizes))
    fulls, pos = [], 0
    for m, c, w, s in zip(rows, chunks, widths, sizes):
        block = out[:, pos : pos + s].reshape(world * c, w)[:m]
        fulls.append(block.contiguous())
        pos += s
    return fulls


def gather_full(loc: torch.Tensor, info: ShardInfo, shape: Sequence[int] | None = None) -> torch.Tensor:
    """The whole tensor (``loc``'s dtype) whose row shard on this rank is ``loc``, split like the
    parameter of ``info``: of the parameter's shape, or of ``shape`` (as many rows, other columns,
    such as a left basis ``m x r``). One all-gather; every rank of the group must call it."""
    shape = torch.Size(info.shape if shape is None else shape)
    rows = shape[0] if len(shape) else 1
    width = math.prod(shape[1:]) if len(shape) >= 2 else 1
    return all_gather_rows([loc.float().reshape(-1, width)], [rows], info.group)[0].view(shape).to(loc.dtype)


def reduce_scatter_cols(mats: Sequence[torch.Tensor], group: Any) -> list[torch.Tensor]:
    """For each ``r x n`` float32 matrix (a rank's partial sum), this rank's columns (``col_range``)
    of the sum over the ranks: ONE reduce-scatter for the whole list."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if not mats:
        return []
    device = mats[0].device
    chunks = [-(-M.shape[1] // world) for M in mats]
    pieces = []
    for M, c in zip(mats, chunks):
        padded = torch.zeros(world * c, M.shape[0], dtype=torch.float32, device=device)
        padded[: M.shape[1]] = M.t()
        pieces.append(padded.view(world, c * M.shape[0]))
    inp = torch.cat(pieces, dim=1).reshape(-1)
    out = torch.empty(inp.numel() // world, dtype=torch.float32, device=device)
    dist.reduce_scatter_tensor(out, inp, op=dist.ReduceOp.SUM, group=group)
    res, pos = [], 0
    for M, c in zip(mats, chunks):
        c0, c1 = col_range(M.shape[1], world, rank)
        block = out[pos : pos + c * M.shape[0]].view(c, M.shape[0])[: c1 - c0]
        res.append(block.t().contiguous())
        pos += c * M.shape[0]
    return res


def all_gather_cols(parts: Sequence[torch.Tensor], cols: Sequence[int], group: Any) -> list[torch.Tensor]:
    """The full ``r x n`` matrices whose column shards (``col_range``) are ``parts``: ONE all-gather
    (:func:`all_gather_rows` of the transposes)."""
    return [f.t().contiguous() for f in all_gather_rows([p.t() for p in parts], cols, group)]
