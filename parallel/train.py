"""`python -m gpuforge train`: train a reference model with a parallel strategy, compare with one process.

    torchrun --nproc_per_node 2 -m gpuforge train --model tinyllama --strategy zero2 --steps 5
    mpiexec -n 2 python -m gpuforge train --model tinyllama --strategy ddp --comm mpi

Each rank trains on its slice of every global batch; at the end rank 0 trains the same model in one process
on the whole batches and prints the largest parameter difference. No process manager of our own: the
environment comes from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) or from mpiexec.

STRATEGIES maps a name to `build(model, comm, args) -> (forward_module, optimizer)`; the optimizer needs
`zero_grad()`, `step()` and may offer `clip_grad_norm_(max_norm)`. Other strategies register themselves
by adding an entry.
"""

from __future__ import annotations

import argparse
import sys

import torch

from gpuforge.parallel import parity
from gpuforge.parallel.comm import init_comm
from gpuforge.parallel.ddp import DistributedDataParallel
from gpuforge.parallel.fsdp import FullyShardedDataParallel
from gpuforge.parallel.zero import ZeroRedundancyOptimizer

MODEL_ALIASES = {"tinyllama": "tiny_llama", "tiny_llama": "tiny_llama", "tinymoe": "tiny_moe"}


def _ddp(model, comm, args):
    return DistributedDataParallel(model, comm), torch.optim.AdamW(model.parameters(), lr=args.lr)


def _zero(stage):
    def build(model, comm, args):
        return model, ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, comm, stage=stage, lr=args.lr)
    return build


def _zero3(model, comm, args):
    fsdp = FullyShardedDataParallel(model, comm)
    return fsdp, torch.optim.AdamW(fsdp.shard_parameters(), lr=args.lr)


STRATEGIES = {"ddp": _ddp, "zero1": _zero(1), "zero2": _zero(2), "zero3": _zero3}

# Model-parallel strategies run their own loop (stages and shards, not one forward module):
# `train_cli(comm, args)` from parallel/mesh.py, dispatched in main().
MODEL_PARALLEL = ("tp", "pp", "3d")
STRATEGIES.update(dict.fromkeys(MODEL_PARALLEL, "gpuforge.parallel.mesh:train_cli"))


def parse_args(argv):
    p = argparse.ArgumentParser(prog="gpuforge train", description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tinyllama", choices=sorted(set(MODEL_ALIASES) | set(_registered_models())))
    p.add_argument("--strategy", default="ddp", help=f"one of {sorted(STRATEGIES)}")
    p.add_argument("--comm", default="torch", choices=["torch", "mpi"])
    p.add_argument("--nproc", type=int, default=None, help="expected world size (checked, not spawned)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8, help="global batch size (divisible by the world size)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--tp", type=int, default=None, help="tensor-parallel degree (tp, 3d)")
    p.add_argument("--pp", type=int, default=None, help="pipeline stages (pp, 3d)")
    p.add_argument("--dp", type=int, default=None, help="data-parallel degree (3d; default: what is left)")
    p.add_argument("--microbatches", type=int, default=2, help="pipeline micro-batches per step")
    p.add_argument("--schedule", default="1f1b", choices=["gpipe", "1f1b"], help="pipeline schedule")
    p.add_argument("--seq-len", type=int, default=32, help="sequence length (tp, pp, 3d)")
    return p.parse_known_args(argv)[0]


VOLUMES = ("vol0_math", "vol1_architectures", "vol2_llm", "vol3_generative", "vol4_multimodal", "vol5_rl")


def _registered_models() -> dict:
    """Every reference model of every volume, by name (models/: REFERENCE_MODELS)."""
    import importlib

    return {name: ref for volume in VOLUMES
            for name, ref in importlib.import_module(f"gpuforge.models.{volume}").REFERENCE_MODELS.items()}


def _reference_model(name):
    return _registered_models()[MODEL_ALIASES.get(name, name)]


def _train(ref, model, fwd, opt, comm, args, rank, world):
    losses = []
    for step in range(args.steps):
        if comm is not None:
            comm.ledger.step = step
        batch = ref.make_batch(step, args.batch)
        mine = tuple(t.chunk(world)[rank] for t in batch)
        opt.zero_grad()
        loss = ref.loss_fn(fwd, mine)
        loss.backward()
        if hasattr(opt, "clip_grad_norm_"):
            opt.clip_grad_norm_(args.clip)
        elif hasattr(fwd, "clip_grad_norm_"):  # FullyShardedDataParallel clips its shards
            fwd.clip_grad_norm_(args.clip)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        losses.append(loss.item())
    return losses


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.strategy not in STRATEGIES:
        raise SystemExit(f"gpuforge train: --strategy must be one of {sorted(STRATEGIES)}, got {args.strategy!r}")
    comm = init_comm(args.comm)
    if args.strategy in MODEL_PARALLEL:
        from gpuforge.parallel.mesh import train_cli

        try:
            return train_cli(comm, args)
        finally:
            comm.destroy()
    try:
        world = comm.world_size
        if args.nproc is not None and args.nproc != world:
            raise SystemExit(f"gpuforge train: --nproc {args.nproc} but the launcher started {world} processes")
        if args.batch % world:
            raise SystemExit(f"gpuforge train: --batch {args.batch} is not divisible by the world size {world}")
        dtype = getattr(torch, args.dtype)
        ref = _reference_model(args.model)
        torch.manual_seed(0)
        model = ref.build().to(dtype)
        fwd, opt = STRATEGIES[args.strategy](model, comm, args)
        losses = _train(ref, model, fwd, opt, comm, args, comm.rank, world)
        if hasattr(fwd, "gather_full_params"):  # sharded parameters: rebuild them for the comparison
            fwd.gather_full_params()
        ok = True
        if comm.rank == 0:
            torch.manual_seed(0)
            single = ref.build().to(dtype)
            single_opt = torch.optim.AdamW(single.parameters(), lr=args.lr)
            single_losses = _train(ref, single, single, single_opt, None, args, 0, 1)
            diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), single.parameters(),
                                                                  strict=True))
            sent = comm.ledger.total_bytes()
            ok, line = parity.verdict("param - single-process param", diff, args.dtype)
            print(f"strategy={args.strategy} comm={args.comm} world={world} steps={args.steps} "
                  f"dtype={args.dtype}\nrank-0 shard losses {[f'{x:.6f}' for x in losses]}\n"
                  f"single process      {[f'{x:.6f}' for x in single_losses]}\n"
                  f"ledger bytes (rank 0) = {sent}\n{line}", flush=True)
        comm.barrier()
    finally:
        comm.destroy()
    return 0 if comm.rank != 0 or ok else 1
