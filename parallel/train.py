"""`python -m gpuforge train`: train a reference model with a parallel strategy, compare with one process.

    python -m gpuforge train --model tinyllama --strategy zero2 --nproc 2 --steps 5     # hands over to torchrun
    torchrun --nproc_per_node 2 -m gpuforge train --model tinyllama --strategy zero2 --steps 5
    mpiexec -n 2 python -m gpuforge train --model tinyllama --strategy ddp --comm mpi --nproc 2
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nproc_per_node 2 --max-restarts 3 -m gpuforge train \
        --ckpt-dir ckpt --save-every 2 --steps 20

Each rank trains on its slice of every global batch; at the end rank 0 trains the same model in one process
on the whole batches and prints the largest parameter difference. A loss that couples the samples of a batch
(TinyCLIP's contrastive loss) runs in its gathered form (gathered_loss.py), so it matches one process too.
No process manager of our own: the environment comes from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) or
from mpiexec. `--nproc N` outside a launcher (no RANK in the environment, --comm torch) replaces this process by
`torchrun --standalone --nproc_per_node N` running the same command; under mpiexec it is checked against the world
size. (Under torchrun give the count to torchrun: its own parser rejects `--nproc` anywhere on the line as an
ambiguous abbreviation of its --nproc-per-node.)

Fault tolerance: with `--ckpt-dir DIR` the run saves a checkpoint (checkpoint.py) every `--save-every` steps and
after the last one, and starts from the latest checkpoint in DIR when there is one, at any world size or
strategy. A rank that dies makes torchrun (`--max-restarts`) restart the group, which resumes from there and
ends with the parameters of a run without failure. GPUFORGE_FAIL_AT=step-N@R (faults.py) kills rank R at the
start of step N, to try it. Give torchrun TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: by default (torch 2.13) the
restarted workers share the first group's TCPStore and read its stale gloo/NCCL addresses, so the new group's
init fails or hangs (pytorch/pytorch#135712; seen here in 1 of 4 restarts); rank 0 warns when it is missing.

STRATEGIES maps a name to `build(model, comm, args) -> (forward_module, optimizer)`; the optimizer needs
`zero_grad()`, `step()` and may offer `clip_grad_norm_(max_norm)`. Other strategies register themselves
by adding an entry.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from gpuforge.parallel import parity
from gpuforge.parallel.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from gpuforge.parallel.comm import init_comm
from gpuforge.parallel.ddp import DistributedDataParallel
from gpuforge.parallel.faults import fail_point
from gpuforge.parallel.fsdp import FullyShardedDataParallel
from gpuforge.parallel.gathered_loss import GATHERED_FORMS, data_parallel_loss_fn
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
    p = argparse.ArgumentParser(prog="gpuforge train", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", default="tinyllama", choices=sorted(set(MODEL_ALIASES) | set(_trainable_models())))
    p.add_argument("--strategy", default="ddp", help=f"one of {sorted(STRATEGIES)}")
    p.add_argument("--comm", default="torch", choices=["torch", "mpi"])
    p.add_argument("--nproc", type=int, default=None,
                   help="world size: outside a launcher, run under torchrun with N processes; else checked")
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
    p.add_argument("--n-layers", type=int, default=None, help="TinyLlama layers (tp, pp, 3d; default: max(2, pp))")
    p.add_argument("--ckpt-dir", default=None, help="save checkpoints here; resume from the latest one")
    p.add_argument("--save-every", type=int, default=1, help="checkpoint every K steps (with --ckpt-dir)")
    return p.parse_known_args(argv)[0]


def _trainable_models() -> dict:
    """The reference models of every volume (gf.models.reference_models) that train: not the inference-only
    ones, and not a coupled loss without a gathered data-parallel form."""
    from gpuforge.models import reference_models

    return {name: ref for name, ref in reference_models().items()
            if not ref.inference_only and (not ref.coupled or ref.loss_fn in GATHERED_FORMS)}


def reference_model(name):
    """The trainable reference model by name or alias (tinyllama)."""
    return _trainable_models()[MODEL_ALIASES.get(name, name)]


def train_steps(ref, model, fwd, opt, comm, args, rank, world, losses=(), save=None):
    """Steps len(losses) .. args.steps - 1 (so a resumed run continues); returns every step's loss.
    save(steps_done, losses) after each --save-every-th step and after the last."""
    losses = list(losses)
    loss_fn = data_parallel_loss_fn(ref.loss_fn, comm)
    for step in range(len(losses), args.steps):
        if comm is not None:
            comm.ledger.step = step
            fail_point(f"step-{step}", rank)
        batch = ref.make_batch(step, args.batch)
        mine = tuple(t.chunk(world)[rank] for t in batch)
        opt.zero_grad()
        loss = loss_fn(fwd, mine)
        loss.backward()
        if hasattr(opt, "clip_grad_norm_"):
            opt.clip_grad_norm_(args.clip)
        elif hasattr(fwd, "clip_grad_norm_"):  # FullyShardedDataParallel clips its shards
            fwd.clip_grad_norm_(args.clip)
        else:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        losses.append(loss.item())
        if save is not None and (step + 1 == args.steps or (step + 1) % args.save_every == 0):
            save(step + 1, losses)
    return losses


# what a resumed run must share with the run that saved (the strategy and world size may change)
RESUME_CONFIG = ("model", "batch", "lr", "clip", "dtype")


def _checkpointing(args, fwd, opt, comm):
    """(rank 0's losses of the steps already done, save callback) for --ckpt-dir; ([], None) without it."""
    if args.ckpt_dir is None:
        return [], None
    config = {k: getattr(args, k) for k in RESUME_CONFIG}
    losses, path = [], latest_checkpoint(args.ckpt_dir)
    if path is not None:
        meta = load_checkpoint(path, fwd, opt, comm)
        if meta["extra"]["config"] != config:
            raise SystemExit(f"gpuforge train: {path} was saved by a run with {meta['extra']['config']}, this run "
                             f"has {config}; use another --ckpt-dir")
        losses = meta["extra"]["losses"]
        if comm.rank == 0:
            print(f"resumed from {path} after step {meta['step']}", flush=True)

    def save(step, losses):
        save_checkpoint(args.ckpt_dir, step, fwd, opt, comm, extra={"config": config, "losses": losses})
    return losses, save


def _warn_if_restarts_share_the_store(rank: int) -> None:
    """torchrun restarts with the agent's shared TCPStore reuse stale keys (see the module docstring)."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if rank == 0 and restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        print("gpuforge train: warning: torchrun --max-restarts with a shared rendezvous store: a restarted group "
              "can hang or fail at init (pytorch/pytorch#135712); launch torchrun with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1", file=sys.stderr, flush=True)


def _launch_under_torchrun(argv, nproc: int):
    """Replace this process by torchrun running the same command on `nproc` local processes."""
    rest, args = [], iter(argv)
    for arg in args:
        if arg == "--nproc":
            next(args, None)  # its value
        elif not arg.startswith("--nproc="):
            rest.append(arg)
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={nproc}", "-m", "gpuforge", "train", *rest])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.strategy not in STRATEGIES:
        raise SystemExit(f"gpuforge train: --strategy must be one of {sorted(STRATEGIES)}, got {args.strategy!r}")
    if args.save_every < 1:
        raise SystemExit(f"gpuforge train: --save-every must be >= 1, got {args.save_every}")
    if args.ckpt_dir is not None and args.strategy in MODEL_PARALLEL:
        raise SystemExit(f"gpuforge train: --ckpt-dir is for the data-parallel strategies, not {args.strategy!r}")
    if args.nproc is not None and args.comm == "torch" and "RANK" not in os.environ:
        _launch_under_torchrun(argv, args.nproc)
    comm = init_comm(args.comm)
    _warn_if_restarts_share_the_store(comm.rank)
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
        ref = reference_model(args.model)
        torch.manual_seed(0)
        model = ref.build().to(dtype)
        fwd, opt = STRATEGIES[args.strategy](model, comm, args)
        done, save = _checkpointing(args, fwd, opt, comm)
        losses = train_steps(ref, model, fwd, opt, comm, args, comm.rank, world, done, save)
        if hasattr(fwd, "gather_full_params"):  # sharded parameters: rebuild them for the comparison
            fwd.gather_full_params()
        ok = True
        if comm.rank == 0:
            torch.manual_seed(0)
            single = ref.build().to(dtype)
            single_opt = torch.optim.AdamW(single.parameters(), lr=args.lr)
            single_losses = train_steps(ref, single, single, single_opt, None, args, 0, 1)
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
