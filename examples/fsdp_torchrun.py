"""A lorenza optimizer on a model sharded by FSDP2 (``fully_shard``), launched with torchrun.

Each rank holds a row shard of every parameter and perturbs and updates only that shard, with
the noise of the shard's global element indices: the run is the one-process run on the unsharded
model with the same seed, to float rounding, whatever the number of ranks
(``docs/algorithms.md``, "Distributed training"). CPU with gloo, or one GPU per rank with NCCL:

    torchrun --nproc_per_node 2 examples/fsdp_torchrun.py --optimizer MeZO --steps 30
    torchrun --nproc_per_node 3 examples/fsdp_torchrun.py --optimizer AdaZoSAM --save /tmp/ckpt.pt
    python examples/fsdp_torchrun.py --optimizer AdaZoSAM --resume /tmp/ckpt.pt   # one process

``--save`` writes, from rank 0, the whole model and ``optimizer.full_state_dict()`` (one process's
state dict); ``--resume`` loads it with any number of ranks, one included. Build the optimizer
after ``fully_shard`` (it then holds FSDP2's DTensor parameters). GaLore-AdamW needs
``svd="randomized"`` (LORENZA's default: the bases then come from the sharded randomized SVD);
``per_layer=True`` is refused.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from lorenza.demo.model import LlamaLM, lm_loss, parse_size
from lorenza.optim import SAM, AdaZoSAM, GaLoreAdamW, Loren, Lorenza, MeZO, MeZOAdam, make_closure

OPTIMIZERS = {
    "MeZO": lambda ps: MeZO(ps, lr=1e-3, mu=1e-3, num_probes=2, seed=0),
    "MeZOAdam": lambda ps: MeZOAdam(ps, lr=1e-3, mu=1e-3, seed=0),
    "Loren": lambda ps: Loren(ps, lr=1e-3, mu=1e-3, num_queries=4, seed=0),
    "AdaZoSAM": lambda ps: AdaZoSAM(ps, lr=1e-3, mu=1e-3, rho=0.05, seed=0),
    "SAM": lambda ps: SAM(ps, torch.optim.AdamW, rho=0.05, lr=1e-3),
    # bases from the sharded randomized SVD: no rank gathers a gradient
    "GaLoreAdamW": lambda ps: GaLoreAdamW(ps, lr=1e-3, rank=8, update_interval=10, svd="randomized", seed=0),
    "Lorenza": lambda ps: Lorenza(ps, lr=1e-3, mu=1e-3, rho=0.05, rank=8, update_interval=10),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective), else the tensor."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--optimizer", default="MeZO", choices=sorted(OPTIMIZERS))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=12, help="global batch, split over the ranks")
    p.add_argument("--save", default=None, help="checkpoint to write at the end (rank 0)")
    p.add_argument("--resume", default=None, help="checkpoint to start from (any world size)")
    args = p.parse_args(argv)

    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    torch.manual_seed(0)
    model = LlamaLM(parse_size("tiny")).to(device)
    if args.resume:
        ckpt = torch.load(args.resume, weights_only=False)
        model.load_state_dict(ckpt["model"])  # before sharding: whole tensors
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = OPTIMIZERS[args.optimizer](list(model.parameters()))  # after fully_shard
    if args.resume:
        optimizer.load_state_dict(ckpt["optimizer"])  # whole state tensors are cut to this rank's rows

    # A toy task: continue a repeating byte pattern. Every rank draws the same global batch (a
    # function of the step) and takes its share, so the run is the one-process run on the whole batch.
    text = torch.tensor(list(b"def f(x):\n    return x + 1\n" * 64), dtype=torch.int64)
    first = ckpt["step"] if args.resume else 0
    for step in range(first, first + args.steps):
        g = torch.Generator().manual_seed(step)  # the batch of a step, wherever the run resumed
        starts = torch.randint(0, text.numel() - 33, (args.batch,), generator=g)
        batch = torch.stack([text[s : s + 33] for s in starts.tolist()]).chunk(world)[rank].to(device)

        def loss_fn(batch=batch):
            return lm_loss(model, batch)

        if args.optimizer in ("AdamW", "GaLoreAdamW"):
            optimizer.zero_grad()
            loss = loss_fn()
            loss.backward()
            optimizer.step()
        else:
            loss = optimizer.step(make_closure(loss_fn))
        loss = loss.detach().float()
        if distributed:  # the backward pass's loss is the rank's share: report the mean
            dist.all_reduce(loss)
            loss /= world
        if rank == 0 and (step % 10 == 0 or step == first + args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)

    if args.save:
        whole = {k: _full(v) for k, v in model.state_dict().items()}  # collectives: every rank
        state = optimizer.full_state_dict() if hasattr(optimizer, "full_state_dict") else None
        if state is None and distributed:
            raise SystemExit(f"--save: {args.optimizer}'s sharded state is saved with torch.distributed.checkpoint")
        state = state if state is not None else optimizer.state_dict()
        if rank == 0:
            torch.save({"model": whole, "optimizer": state, "step": first + args.steps}, args.save)
            print(f"saved {args.save} (step {first + args.steps}, {world} rank(s))")
    if distributed:
        dist.destroy_process_group()
    return loss.item()


if __name__ == "__main__":
    main()
