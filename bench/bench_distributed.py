"""Memory and traffic per rank under FSDP2: 1, 2 and 3 gloo ranks on the CPU, every supported optimizer.

The demo's tiny Llama (123,200 parameters; ``fully_shard`` per block and at the root; with one
rank the model is not sharded) takes ``--steps`` steps of each optimizer on a batch of 12
sequences split over the ranks. Per rank, measured (not computed):

* **state**: bytes of the optimizer state this rank holds (local shards of ``DTensor`` state,
  whole tensors counted whole), after the last step;
* **grad**: the most gradient bytes this rank holds right after a backward pass of the closure
  (local shards; none for the zeroth-order optimizers, which never call backward);
* **lorenza B/step** and **fsdp B/step**: bytes this rank contributes to the collectives of a step
  (the input of ``all_reduce``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``), split by
  caller: lorenza.optim's own (probe losses, partial sums, the sharded randomized SVD, the
  all-reduce of left-projected ``R``) and FSDP2's (the all-gathers of forwards and backwards, the
  gradient reduce-scatter), averaged over the steps.

Bytes are what a rank *receives* per step in a ring implementation of each collective (all-reduce
``2 (W - 1) / W`` of its input, all-gather ``(W - 1)`` times its input, reduce-scatter
``(W - 1) / W``), so the columns add up and compare.

For GaLore-AdamW (``svd="randomized"``) and LORENZA (its default singular probes), rank 8, bases
refreshed every 2 updates (LORENZA: its first step builds them without an ascent), the last column
is the alternative the sharded randomized SVD replaces: all-gathering each projected gradient at
each refresh (every rank receives ``(W - 1) / W`` of each ``m x n`` matrix, then runs the SVD
itself), averaged over the same steps. The lorenza column holds the sharded SVD's collectives plus,
every step, the all-reduce of ``R = Q^T G`` of the matrices projected on the left.

    python bench/bench_distributed.py [--steps 4] [--worlds 1 2 3] [--size tiny] [--optimizers ...] [--out FILE.md]

Benchmarks are never tests: nothing here asserts.
"""

from __future__ import annotations

import collections
import datetime
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

OPTIMIZERS = ["MeZO", "MeZOAdam", "Loren", "AdaZoSAM", "SAM", "AdamW", "GaLoreAdamW", "Lorenza"]
COLLECTIVES = (
    "all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "all_gather_single", "reduce_scatter_single",
)  # fmt: skip
RANK, INTERVAL = 8, 2


def _build(name: str, params):
    from lorenza.optim import SAM, AdaZoSAM, GaLoreAdamW, Loren, Lorenza, MeZO, MeZOAdam

    return {
        "MeZO": lambda: MeZO(params, lr=1e-3, mu=1e-3, num_probes=1, seed=0),
        "MeZOAdam": lambda: MeZOAdam(params, lr=1e-3, mu=1e-3, seed=0),
        "Loren": lambda: Loren(params, lr=1e-3, mu=1e-3, num_queries=4, seed=0),
        "AdaZoSAM": lambda: AdaZoSAM(params, lr=1e-3, mu=1e-3, rho=0.05, seed=0),
        "SAM": lambda: SAM(params, torch.optim.AdamW, rho=0.05, lr=1e-3),
        "AdamW": lambda: torch.optim.AdamW(params, lr=1e-3),
        "GaLoreAdamW": lambda: GaLoreAdamW(params, lr=1e-3, rank=RANK, update_interval=INTERVAL, svd="randomized"),
        "Lorenza": lambda: Lorenza(params, lr=1e-3, mu=1e-3, rho=0.05, rank=RANK, update_interval=INTERVAL),
    }[name]()


def received(name: str, nbytes: int, world: int) -> float:
    """Bytes a rank receives in a ring implementation of the collective whose input is ``nbytes``:
    all-reduce ``2 (W - 1) / W b``, all-gather ``(W - 1) b``, reduce-scatter ``(W - 1) / W b``."""
    if name == "all_reduce":
        return 2 * (world - 1) / world * nbytes
    if name.startswith("all_gather"):
        return (world - 1) * nbytes
    return (world - 1) / world * nbytes


class Counter:
    """Wraps torch.distributed's collectives: bytes of their inputs, by caller (lorenza or not)."""

    def __init__(self, world: int):
        self.world = world
        self.bytes = collections.Counter()
        self._orig = {}
        self._depth = 0  # a deprecated name calls the new one: count the outer call only

    def __enter__(self):
        for fname in COLLECTIVES:
            orig = getattr(dist, fname, None)
            if orig is None:
                continue
            self._orig[fname] = orig

            def wrapped(*args, _orig=orig, _name=fname, **kwargs):
                if self._depth == 0:
                    pos, keys = (0, ("tensor",)) if _name == "all_reduce" else (1, ("input_tensor", "input"))
                    t = args[pos] if len(args) > pos else next(kwargs[k] for k in keys if k in kwargs)
                    caller = sys._getframe(1).f_globals.get("__name__", "")
                    who = "lorenza" if caller.startswith("lorenza") else "fsdp"
                    self.bytes[who] += received(_name, t.numel() * t.element_size(), self.world)
                self._depth += 1
                try:
                    return _orig(*args, **kwargs)
                finally:
                    self._depth -= 1

            setattr(dist, fname, wrapped)
        return self

    def __exit__(self, *exc):
        for fname, orig in self._orig.items():
            setattr(dist, fname, orig)


def _local_bytes(tensors) -> int:
    from lorenza.optim._sharding import local

    return sum(local(t).numel() * local(t).element_size() for t in tensors if isinstance(t, torch.Tensor))


def _run(rank: int, world: int, steps: int, size: str, names: list[str]) -> dict:
    from lorenza.demo.model import LlamaLM, lm_loss, parse_size

    text = torch.tensor(list(b"def f(x):\n    return x + 1\n" * 64), dtype=torch.int64)
    out = {}
    for name in names:
        torch.manual_seed(0)
        model = LlamaLM(parse_size(size))
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh("cpu", (world,))
            for layer in model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        opt = _build(name, list(model.parameters()))
        counts, held, times = collections.Counter(), [0], []
        for step in range(steps):
            g = torch.Generator().manual_seed(step)
            starts = torch.randint(0, text.numel() - 33, (12,), generator=g)
            batch = torch.stack([text[s : s + 33] for s in starts.tolist()]).chunk(world)[rank]

            def closure(batch=batch):  # the closure protocol; records the gradients held after a backward
                loss = lm_loss(model, batch)
                if torch.is_grad_enabled():
                    loss.backward()
                    held[0] = max(held[0], _local_bytes(p.grad for p in model.parameters() if p.grad is not None))
                return loss

            t0 = time.perf_counter()
            with Counter(world) as c:
                if name == "AdamW":
                    opt.zero_grad()
                    with torch.enable_grad():
                        closure()
                    opt.step()
                else:
                    opt.step(closure)
            times.append((time.perf_counter() - t0) * 1e3)
            counts.update(c.bytes)
        states = (opt.base_optimizer if name == "SAM" else opt).state.values()
        state = _local_bytes(v for st in states for v in st.values())
        grads = held[0]
        gather = 0
        if name in ("GaLoreAdamW", "Lorenza") and world > 1:  # the alternative: all-gather each projected gradient
            import lorenza_kernels as lk

            refreshes = len(range(0, steps, INTERVAL))  # at updates 0, INTERVAL, ...
            for p in model.parameters():
                if p.dim() >= 2 and RANK < min(lk.matrix_dims(p)):
                    gather += p.numel() * 4 * (world - 1) / world * refreshes / steps
        out[name] = {
            "state": state,
            "grad": grads,
            "lorenza": counts["lorenza"] / steps,
            "fsdp": counts["fsdp"] / steps,
            "gather": gather,
            "times": sorted(times),
        }
    return out


def _worker(rank: int, world: int, port: int, steps: int, path: str, size: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        res = _run(rank, world, steps, size, names)
        if rank == 0:
            torch.save(res, path)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> str:
    p = common.parser(__doc__.splitlines()[0])  # --device is ignored: gloo ranks on the CPU
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 4; --quick: 2)")
    p.add_argument("--worlds", type=int, nargs="+", default=None, help="world sizes (default 1 2 3; --quick: 1 2)")
    p.add_argument("--optimizers", nargs="+", default=OPTIMIZERS, choices=OPTIMIZERS)
    p.add_argument("--size", default="tiny", help="the demo model's size (lorenza.demo.model.parse_size)")
    p.add_argument("--out", default=None, help="write the markdown table here")
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 4)
    args.worlds = args.worlds or ([1, 2] if args.quick else [1, 2, 3])
    from lorenza.demo.model import LlamaLM, parse_size

    params = sum(p.numel() for p in LlamaLM(parse_size(args.size)).parameters())
    rows = []
    for world in args.worlds:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rank0.pt")
            torch.multiprocessing.spawn(
                _worker, args=(world, port, args.steps, path, args.size, args.optimizers), nprocs=world, join=True
            )
            res = torch.load(path, weights_only=True)
        for name, r in res.items():
            rows.append((name, world, r))
    lines = [
        f"FSDP2 on gloo (CPU), demo {args.size} Llama ({params:,} parameters), {args.steps} steps, rank 0's "
        "numbers (bytes; B/step: received per step in a ring implementation, averaged over the steps)",
        "",
        "| optimizer | ranks | state | grad | lorenza B/step | fsdp B/step | gathering instead B/step |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, world, r in sorted(rows, key=lambda x: (OPTIMIZERS.index(x[0]), x[1])):
        gather = f"{r['gather']:,.0f}" if r["gather"] else ""
        lines.append(
            f"| {name} | {world} | {r['state']:,} | {r['grad']:,} | {r['lorenza']:,.0f} | {r['fsdp']:,.0f} | {gather} |"
        )
    table = "\n".join(lines)
    report = common.Report("distributed", "cpu")
    for name, world, r in rows:
        report.add(f"{world} ranks", name, common.quantiles(r["times"]), state_B=r["state"], grad_B=r["grad"],
                   lorenza_B_step=r["lorenza"], fsdp_B_step=r["fsdp"],
                   gather_instead_B_step=r["gather"] or None)  # fmt: skip
    report.finish(args.json)
    print()
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    return table


if __name__ == "__main__":
    main()
