"""`python -m gpuforge train`: train a reference model with a parallel strategy, compare with one process.

    python -m gpuforge train --model tinyllama --strategy zero2 --nproc 2 --steps 5     # hands over to torchrun
    torchrun --nproc_per_node 2 -m gpuforge train --model tinyllama --strategy zero2 --steps 5
    mpiexec -n 2 python -m gpuforge train --model tinyllama --strategy ddp --comm mpi --nproc 2
    torchrun --nproc_per_node 2 -m gpuforge train --cp 2 --seq-len 32       # ring attention (or --cp-attention ulysses)
    torchrun --nproc_per_node 8 -m gpuforge train --strategy 3d --tp 2 --pp 2 --cp 2       # 4D: dp × tp × pp × cp
    torchrun --nproc_per_node 4 -m gpuforge train --strategy pp --pp 2 --ep 2     # TinyMoE: dp 2 × pp 2, ep 2
    mpiexec -n 2 python -m gpuforge train --ep 2 --comm mpi                 # TinyMoE, experts over 2 ranks
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun --nproc_per_node 2 --max-restarts 3 -m gpuforge train \
        --ckpt-dir ckpt --save-every 2 --steps 20
    torchrun --nproc_per_node 2 -m gpuforge train --strategy pp --schedule zb1p --checkpoint-activations
    torchrun --nproc_per_node 2 -m gpuforge train --strategy pp --schedule interleaved --n-layers 4 --ckpt-dir ckpt

Each rank trains on its slice of every global batch; at the end rank 0 trains the same model in one process
on the whole batches and prints the largest parameter difference. A loss that couples the samples of a batch
(TinyCLIP's contrastive loss) runs in its gathered form (training/gathered_loss.py), so it matches one process too.
No process manager of our own: the environment comes from torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR) or
from mpiexec. `--nproc N` outside a launcher (no RANK in the environment, --comm torch) replaces this process by
`torchrun --standalone --nproc_per_node N` running the same command; under mpiexec it is checked against the world
size. (Under torchrun give the count to torchrun: its own parser rejects `--nproc` anywhere on the line as an
ambiguous abbreviation of its --nproc-per-node.)

Fault tolerance: with `--ckpt-dir DIR` the run saves a checkpoint (checkpoint/sharded.py) every `--save-every` steps and
after the last one, and starts from the latest checkpoint in DIR when there is one, at any world size or
strategy (tp, pp and 3d: the layout-free full-model checkpoint of checkpoint/layout.py, at any dp × tp × pp × cp).
A rank that dies makes torchrun (`--max-restarts`) restart the group, which resumes from there and
ends with the parameters of a run without failure. GPUFORGE_FAIL_AT=step-N@R (checkpoint/faults.py) kills rank R at the
start of step N, to try it. Give torchrun TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: by default (torch 2.13) the
restarted workers share the first group's TCPStore and read its stale gloo/NCCL addresses, so the new group's
init fails or hangs (pytorch/pytorch#135712; seen here in 1 of 4 restarts); rank 0 warns when it is missing.

The data-parallel strategies (DATA_PARALLEL) train through `DataParallelTrainer` (data_parallel.py), the
model-parallel ones (MODEL_PARALLEL: a TinyLlama over a dp × tp × pp (× cp) mesh) through `Trainer3D`
(trainer_3d.py); both step through loop.py's one loop. Without a launcher and without --nproc the command
runs on 1 process (a world of one, still compared with the single-process reference).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from gpuforge.models import reference_models
from gpuforge.models.activation_checkpointing import POLICIES, checkpoint_blocks
from gpuforge.models.vol2_llm import TinyLlamaConfig
from gpuforge.parallel.checkpoint import layout
from gpuforge.parallel.checkpoint.faults import fail_point
from gpuforge.parallel.checkpoint.sharded import (
    FORMAT,
    latest_checkpoint,
    load_checkpoint,
    read_metadata,
    save_checkpoint,
)
from gpuforge.parallel.comm import init_comm
from gpuforge.parallel.model_parallel.context_parallel import check_cp_config, sequence_positions
from gpuforge.parallel.model_parallel.expert_parallel import check_ep_config
from gpuforge.parallel.model_parallel.mesh import check_degrees, check_layout
from gpuforge.parallel.training import parity
from gpuforge.parallel.training.data_parallel import OURS, DataParallelTrainer
from gpuforge.parallel.training.gathered_loss import GATHERED_FORMS, DataParallelLoss
from gpuforge.parallel.training.loop import run_steps
from gpuforge.parallel.training.trainer_3d import single_process_losses, train_model_parallel
from gpuforge.parallel.training.trainer_cp_ep import default_config, single_process_cp_ep_losses, train_cp_ep
from gpuforge.parallel.training.trainer_moe_pipeline import train_moe_pipeline

MODEL_ALIASES = {"tinyllama": "tiny_llama", "tinymoe": "tiny_moe"}
DATA_PARALLEL = OURS
MODEL_PARALLEL = ("tp", "pp", "3d")
SEQUENCE_AND_EXPERT = ("cp", "ep")
STRATEGIES = DATA_PARALLEL + MODEL_PARALLEL + SEQUENCE_AND_EXPERT
SCHEDULES = {"gpipe": "gpipe", "1f1b": "1f1b", "interleaved": "interleaved-1f1b", "zb1p": "zb-h1",
             "dualpipev": "dualpipev"}  # option: runtime


def _positive(convert, expected: str):
    """An argparse type: `convert(text)`, which must be > 0 and finite, else argparse's error naming the option."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < float("inf"):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value
    return parse


_positive_int = _positive(int, "a positive integer")
_positive_float = _positive(float, "a positive finite number")


def _trainable_models() -> dict:
    """The reference models of every volume (gf.models.reference_models) that train: not the inference-only
    ones, and not a coupled loss without a gathered data-parallel form."""
    return {name: ref for name, ref in reference_models().items()
            if not ref.inference_only and (not ref.coupled or ref.loss_fn in GATHERED_FORMS)}


def reference_model(name):
    """The trainable reference model by name or alias (tinyllama)."""
    return _trainable_models()[MODEL_ALIASES.get(name, name)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gpuforge train", description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--model", default=None, choices=sorted(set(MODEL_ALIASES) | set(_trainable_models())),
                   help="default: tinymoe for --strategy ep, else tinyllama")
    p.add_argument("--strategy", default=None, choices=STRATEGIES,
                   help="default: cp with --cp, ep with --ep, else ddp")
    p.add_argument("--comm", default="torch", choices=["torch", "mpi"])
    p.add_argument("--nproc", type=_positive_int, default=None,
                   help="world size: outside a launcher, run under torchrun with N processes; else checked")
    p.add_argument("--steps", type=_positive_int, default=5)
    p.add_argument("--batch", type=_positive_int, default=8, help="global batch size (divisible by the world size)")
    p.add_argument("--lr", type=_positive_float, default=1e-3)
    p.add_argument("--clip", type=_positive_float, default=1.0, help="max global gradient norm")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--device", default="cpu", choices=["cpu"] + (["cuda"] if torch.cuda.is_available() else []),
                   help="cpu (gloo, MPI); cuda is offered only where torch sees a GPU")
    p.add_argument("--tp", type=_positive_int, default=None, help="tensor-parallel degree (tp, 3d)")
    p.add_argument("--pp", type=_positive_int, default=None, help="pipeline stages (pp, 3d)")
    p.add_argument("--dp", type=_positive_int, default=None, help="data-parallel degree (3d; default: what is left)")
    p.add_argument("--cp", type=_positive_int, default=None,
                   help="context-parallel degree (cp, or with tp/pp/3d a 4D mesh: the TinyLlama's sequence over cp "
                        "ranks; dp: what is left)")
    p.add_argument("--cp-attention", default="ring", choices=["ring", "ulysses"],
                   help="cp: ring attention (zigzag) or Ulysses all-to-all")
    p.add_argument("--ep", type=_positive_int, default=None,
                   help="expert-parallel degree (ep: the TinyMoE's experts over ep ranks; dp: the world size)")
    p.add_argument("--capacity-factor", type=_positive_float, default=None,
                   help="ep: tokens per expert as a multiple of an even share (default: no drops)")
    p.add_argument("--microbatches", type=_positive_int, default=2, help="pipeline micro-batches per step")
    p.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES),
                   help="pipeline schedule: gpipe, 1f1b, interleaved (1F1B over --virtual-stages model chunks per "
                        "stage), zb1p (ZB-H1 zero bubble), dualpipev (2 chunks per stage in a V; micro-batches "
                        ">= 2 pp)")
    p.add_argument("--virtual-stages", type=_positive_int, default=None,
                   help="model chunks per pipeline stage (--schedule interleaved; default 2)")
    p.add_argument("--checkpoint-activations", nargs="?", const="full", default=None, choices=POLICIES,
                   help="recompute each block's activations in backward: full (default) or selective")
    p.add_argument("--seq-len", type=_positive_int, default=32, help="sequence length (tp, pp, 3d)")
    p.add_argument("--n-layers", type=_positive_int, default=None,
                   help="TinyLlama layers (tp, pp, 3d; default: max(2, pp))")
    p.add_argument("--ckpt-dir", default=None, help="save checkpoints here; resume from the latest one")
    p.add_argument("--save-every", type=_positive_int, default=1, help="checkpoint every K steps (with --ckpt-dir)")
    return p


def parse_args(argv):
    p = parser()
    args = p.parse_args(argv)
    if args.virtual_stages is not None and args.schedule != "interleaved":
        p.error(f"--virtual-stages is for --schedule interleaved, not {args.schedule!r}")
    if args.virtual_stages is None:
        args.virtual_stages = 2 if args.schedule in ("interleaved", "dualpipev") else 1
    if args.strategy is None:
        args.strategy = "cp" if args.cp is not None else "ep" if args.ep is not None else "ddp"
    moe_pipeline = args.strategy in MODEL_PARALLEL and args.ep is not None
    if args.model is None:
        args.model = "tinymoe" if args.strategy == "ep" or moe_pipeline else "tinyllama"
    if args.ep is not None and args.strategy in DATA_PARALLEL:
        p.error(f"--ep is for --strategy ep, pp or 3d, not {args.strategy!r}")
    if moe_pipeline and (args.tp or args.cp or args.ckpt_dir):
        p.error("--ep with --strategy pp/3d trains the TinyMoE over dp × pp × ep: no --tp, --cp or --ckpt-dir")
    if args.cp is not None and args.ep is not None and args.cp > 1 and args.ep > 1:
        p.error("--cp and --ep together: the TinyMoE balances its experts per sequence, which a sharded "
                "sequence would change; use one of them")
    if args.cp is not None and args.strategy in DATA_PARALLEL:
        p.error(f"--cp is for --strategy cp, tp, pp or 3d, not {args.strategy!r}")
    if (args.strategy == "cp" and args.ep is not None) or (args.strategy == "ep" and args.cp is not None):
        p.error(f"--strategy {args.strategy} does not take --{'ep' if args.strategy == 'cp' else 'cp'}")
    if args.ckpt_dir is not None and args.strategy in SEQUENCE_AND_EXPERT:
        p.error(f"--ckpt-dir is for the data-parallel and tp/pp/3d strategies, not {args.strategy!r}")
    if args.checkpoint_activations == "selective" and args.schedule in ("zb1p", "dualpipev"):
        p.error(f"--checkpoint-activations selective: --schedule {args.schedule} runs two backward passes over "
                "each block (B, then W) and torch's selective checkpointing allows one; use full")
    if args.checkpoint_activations is not None and args.strategy in SEQUENCE_AND_EXPERT:
        p.error(f"--checkpoint-activations is for the data-parallel and tp/pp/3d strategies, not {args.strategy!r}")
    if args.ckpt_dir is not None:
        _check_writable(p, Path(args.ckpt_dir))
    return args


def _check_writable(p: argparse.ArgumentParser, root: Path) -> None:
    """--ckpt-dir must be a directory this process can create and write into: tried now, not at the first save."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as err:
        p.error(f"--ckpt-dir {root}: not a writable directory ({err.strerror})")


def data_parallel_trainer(ref, strategy: str, comm, args) -> tuple[torch.nn.Module, DataParallelTrainer]:
    """(model, trainer) of a reference model in --dtype, as `gpuforge train` builds them (seed 0)."""
    torch.manual_seed(0)
    model = ref.build().to(getattr(torch, args.dtype))
    if getattr(args, "checkpoint_activations", None) is not None:
        try:
            checkpoint_blocks(model, args.checkpoint_activations)
        except ValueError as err:
            raise SystemExit(f"gpuforge train --checkpoint-activations: {err}") from None
    return model, DataParallelTrainer(strategy, DataParallelLoss(model, ref.loss_fn, comm), comm, lr=args.lr)


def train_steps(ref, trainer: DataParallelTrainer, comm, args, losses=(), save=None) -> list[float]:
    """Steps len(losses) .. args.steps − 1 of this rank's slices of the reference model's batches (one process:
    comm None, the whole batches). save(steps_done, losses) after each --save-every-th step and after the last."""
    rank, world = (0, 1) if comm is None else (comm.rank, comm.world_size)

    def before_step(step):
        if comm is not None:
            comm.ledger.step = step
            fail_point(f"step-{step}", rank)

    def after_step(done, losses):
        if save is not None and (done == args.steps or done % args.save_every == 0):
            save(done, losses)

    return run_steps(trainer, lambda step: [tuple(t.chunk(world)[rank] for t in ref.make_batch(step, args.batch))],
                     args.steps, max_norm=args.clip, losses=losses, before_step=before_step, after_step=after_step)


# what a resumed run must share with the run that saved (the strategy and world size may change)
RESUME_CONFIG = ("model", "batch", "lr", "clip", "dtype")


def _checkpointing(args, trainer, comm):
    """(rank 0's losses of the steps already done, save callback) for --ckpt-dir; ([], None) without it."""
    if args.ckpt_dir is None:
        return [], None
    config = {k: getattr(args, k) for k in RESUME_CONFIG}
    losses, path = [], latest_checkpoint(args.ckpt_dir)
    if path is not None:
        saved = read_metadata(path, FORMAT).get("extra", {}).get("config")
        if saved != config:  # before loading: another model's shards would fail deep in the loader
            raise SystemExit(f"gpuforge train: {path} was saved by a run with {saved}, this run has {config}; "
                             "use another --ckpt-dir")
        meta = load_checkpoint(path, trainer.forward, trainer.optimizer, comm)
        losses = meta["extra"]["losses"]
        if comm.rank == 0:
            print(f"resumed from {path} after step {meta['step']}", flush=True)

    def save(step, losses):
        save_checkpoint(args.ckpt_dir, step, trainer.forward, trainer.optimizer, comm,
                        extra={"config": config, "losses": losses})
    return losses, save


# the model-parallel runs must also share the sequence length (the layout checkpoint checks the model's config)
RESUME_CONFIG_3D = (*RESUME_CONFIG, "seq_len")


def _layout_checkpointing(args, comm) -> dict:
    """train_model_parallel's hooks for --ckpt-dir (none without it): load the latest layout checkpoint into
    the trainer, fail at GPUFORGE_FAIL_AT, save every --save-every steps and after the last."""
    hooks = {"before_step": lambda step: fail_point(f"step-{step}", comm.rank)}
    if args.ckpt_dir is None:
        return hooks
    config = {k: getattr(args, k) for k in RESUME_CONFIG_3D}
    built = {}

    def ready(trainer):
        built["trainer"] = trainer
        path = latest_checkpoint(args.ckpt_dir)
        if path is None:
            return []
        try:
            saved = read_metadata(path, layout.FORMAT).get("extra", {}).get("config")
        except ValueError as err:
            raise SystemExit(f"gpuforge train: {err}; use another --ckpt-dir") from None
        if saved != config:
            raise SystemExit(f"gpuforge train: {path} was saved by a run with {saved}, this run has {config}; "
                             "use another --ckpt-dir")
        step = layout.load_layout_checkpoint(path, trainer)
        if comm.rank == 0:
            print(f"resumed from {path} after step {step}", flush=True)
        return read_metadata(path, layout.FORMAT)["extra"]["losses"]

    def save(done, losses):
        if done == args.steps or done % args.save_every == 0:
            layout.save_layout_checkpoint(args.ckpt_dir, built["trainer"], done,
                                          extra={"config": config, "losses": losses})
    return {**hooks, "trainer_ready": ready, "after_step": save}


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


def _run_data_parallel(comm, args) -> int:
    world = comm.world_size
    if args.batch % world:
        raise SystemExit(f"gpuforge train: --batch {args.batch} is not divisible by the world size {world}")
    ref = reference_model(args.model)
    model, trainer = data_parallel_trainer(ref, args.strategy, comm, args)
    done, save = _checkpointing(args, trainer, comm)
    losses = train_steps(ref, trainer, comm, args, done, save)
    trainer.gather_full_params()  # sharded parameters: rebuilt whole for the comparison
    ok = True
    if comm.rank == 0:
        single, single_trainer = data_parallel_trainer(ref, "single", None, args)
        single_losses = train_steps(ref, single_trainer, None, args)
        diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), single.parameters(), strict=True))
        ok, line = parity.verdict("param - single-process param", diff, args.dtype)
        print(f"strategy={args.strategy} comm={args.comm} world={world} steps={args.steps} "
              f"dtype={args.dtype}\nrank-0 shard losses {[f'{x:.6f}' for x in losses]}\n"
              f"single process      {[f'{x:.6f}' for x in single_losses]}\n"
              f"ledger bytes (rank 0) = {comm.ledger.total_bytes()}\n{line}", flush=True)
    comm.barrier()
    return 0 if ok else 1


def _report_loss_parity(comm, header: str, losses, single_losses, dtype: str, judge=None) -> int:
    """Rank 0 runs `single_losses()` (the one-process oracle), prints both loss curves under `header` with the
    verdict on their largest difference (`judge(diff)` -> (ok, line) or the dtype's tolerance). Exit status."""
    ok = True
    if comm.rank == 0:
        single = single_losses()
        diff = max(abs(a - b) for a, b in zip(losses, single, strict=True))
        ok, line = judge(diff) if judge else parity.verdict("loss - single-process loss", diff, dtype)
        print(f"{header}\nlosses         {[f'{x:.6f}' for x in losses]}\n"
              f"single process {[f'{x:.6f}' for x in single]}\n{line}", flush=True)
    return 0 if ok else 1


def _run_model_parallel(comm, args) -> int:
    """--strategy tp|pp|3d [--tp T --pp P --dp D --cp C --n-layers L]: unset degrees default to 1, except the one
    the strategy names (the world size over cp) and --dp (whatever is left); --cp C > 1 shards the sequence too
    (4D: dp × tp × pp × cp, ring attention or --cp-attention ulysses); the TinyLlama gets max(2, pp) layers unless
    --n-layers says. A configuration that cannot run exits with a message naming the option, on every rank,
    before any process group is made. Rank 0 compares the losses with one process."""
    if MODEL_ALIASES.get(args.model, args.model) == "tiny_moe" and args.strategy != "tp":
        return _run_moe_pipeline(comm, args)
    if MODEL_ALIASES.get(args.model, args.model) != "tiny_llama":
        raise SystemExit(f"gpuforge train: --strategy {args.strategy} trains the TinyLlama (or, pp/3d, the TinyMoE), "
                         f"not --model {args.model}")
    world = comm.world_size
    cp = args.cp or 1
    tp = args.tp if args.tp is not None else (world // cp if args.strategy == "tp" else 1)
    pp = args.pp if args.pp is not None else (world // cp if args.strategy == "pp" else 1)
    dp = args.dp if args.dp is not None else max(1, world // max(1, tp * pp * cp))
    v = args.virtual_stages
    n_layers = args.n_layers or max(2, pp * v)
    schedule = SCHEDULES[args.schedule]
    try:
        config = TinyLlamaConfig(n_layers=n_layers, max_seq_len=max(args.seq_len, 256))
        check_layout(world, config, dp=dp, tp=tp, pp=pp, cp=cp, cp_attention=args.cp_attention,
                     seq_len=args.seq_len, batch_size=args.batch, num_microbatches=args.microbatches,
                     schedule=schedule, num_chunks=v)
    except ValueError as e:
        raise SystemExit(f"gpuforge train --strategy {args.strategy}: {e} (--dp {dp} --tp {tp} --pp {pp} --cp {cp} "
                         f"--n-layers {n_layers} --batch {args.batch} --microbatches {args.microbatches} "
                         f"--schedule {args.schedule} --virtual-stages {v}, world size {world})") from None
    opts = dict(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr, max_norm=args.clip,
                config=config, dtype=getattr(torch, args.dtype))
    losses = train_model_parallel(comm, dp=dp, tp=tp, pp=pp, cp=cp, cp_attention=args.cp_attention,
                                  num_microbatches=args.microbatches,
                                  schedule=schedule, num_chunks=v, checkpoint_activations=args.checkpoint_activations,
                                  **_layout_checkpointing(args, comm), **opts)
    header = (f"strategy={args.strategy} dp={dp} tp={tp} pp={pp} cp={cp} n_layers={n_layers} schedule={args.schedule} "
              f"virtual_stages={v} microbatches={args.microbatches} "
              f"checkpoint_activations={args.checkpoint_activations} dtype={args.dtype}")
    return _report_loss_parity(comm, header, losses, lambda: single_process_losses(**opts), args.dtype)


def _run_moe_pipeline(comm, args) -> int:
    """--strategy pp|3d --model tinymoe [--pp P --dp D --ep E]: the TinyMoE over dp × pp with its experts over
    ep (ep dividing dp; no drops). Rank 0 compares the losses with one process."""
    world = comm.world_size
    ep = args.ep or 1
    pp = args.pp if args.pp is not None else (world // max(ep, 1) if args.strategy == "pp" else 1)
    dp = args.dp if args.dp is not None else max(1, world // pp)
    config = default_config("ep", args.seq_len)
    config.n_layers = args.n_layers or max(2, pp * args.virtual_stages)
    schedule = SCHEDULES[args.schedule]
    try:
        check_layout(world, config, dp=dp, tp=1, pp=pp, batch_size=args.batch, num_microbatches=args.microbatches,
                     schedule=schedule, num_chunks=args.virtual_stages)
        check_degrees(world, dp=dp, tp=1, pp=pp, ep=ep)
        check_ep_config(config.n_experts, ep)
    except ValueError as e:
        raise SystemExit(f"gpuforge train --strategy {args.strategy} --model tinymoe: {e} (--dp {dp} --pp {pp} "
                         f"--ep {ep} --batch {args.batch} --microbatches {args.microbatches}, world size {world})"
                         ) from None
    opts = dict(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr, max_norm=args.clip,
                config=config, dtype=getattr(torch, args.dtype))
    losses = train_moe_pipeline(comm, dp=dp, pp=pp, ep=ep, schedule=schedule, num_microbatches=args.microbatches,
                                num_chunks=args.virtual_stages, checkpoint_activations=args.checkpoint_activations,
                                **opts)
    header = (f"strategy={args.strategy} model=tinymoe dp={dp} pp={pp} ep={ep} schedule={args.schedule} "
              f"microbatches={args.microbatches} checkpoint_activations={args.checkpoint_activations} "
              f"dtype={args.dtype}")
    return _report_loss_parity(comm, header, losses, lambda: single_process_cp_ep_losses("ep", **opts), args.dtype)


def _run_sequence_or_expert_parallel(comm, args) -> int:
    """--strategy cp [--cp N --cp-attention ring|ulysses] (TinyLlama; dp = world / cp) or --strategy ep
    [--ep N --capacity-factor C] (TinyMoE; dp = world, ep dividing it). A configuration that cannot run exits
    with a message naming the option, on every rank, before any process group is made. Rank 0 compares the
    losses with one process."""
    kind, world = args.strategy, comm.world_size
    expected = "tiny_moe" if kind == "ep" else "tiny_llama"
    if MODEL_ALIASES.get(args.model, args.model) != expected:
        raise SystemExit(f"gpuforge train: --strategy {kind} trains the {expected}, not --model {args.model}")
    cp = (args.cp or world) if kind == "cp" else 1
    ep = (args.ep or world) if kind == "ep" else 1
    dp = world // cp
    config = default_config(kind, args.seq_len)
    if args.n_layers:
        config.n_layers = args.n_layers
    try:
        check_degrees(world, dp=dp, tp=1, pp=1, cp=cp, ep=ep)
        if kind == "cp":
            check_cp_config(config, cp, args.cp_attention)
            sequence_positions(args.seq_len, cp, 0, args.cp_attention)
        else:
            check_ep_config(config.n_experts, ep, args.capacity_factor)
        if args.batch % dp:
            raise ValueError(f"batch size {args.batch} must be divisible by dp = {dp}")
    except ValueError as e:
        raise SystemExit(f"gpuforge train --strategy {kind}: {e} (--cp {cp} --ep {ep} --batch {args.batch} "
                         f"--seq-len {args.seq_len}, world size {world})") from None
    opts = dict(steps=args.steps, batch_size=args.batch, seq_len=args.seq_len, lr=args.lr, max_norm=args.clip,
                config=config, dtype=getattr(torch, args.dtype))
    losses = train_cp_ep(comm, kind, dp=dp, cp=cp, ep=ep, attention=args.cp_attention,
                         capacity_factor=args.capacity_factor, **opts)
    header = (f"strategy={kind} dp={dp} cp={cp} ep={ep} attention={args.cp_attention} dtype={args.dtype} "
              f"ledger bytes (rank 0) = {comm.ledger.total_bytes()}")
    judge = None
    if args.capacity_factor is not None:  # dropping tokens is not what one process computes
        judge = lambda diff: (True, f"capacity factor {args.capacity_factor}: max |loss - no-drop loss| = {diff:.3e}")  # noqa: E731
    return _report_loss_parity(comm, header, losses, lambda: single_process_cp_ep_losses(kind, **opts), args.dtype,
                               judge)


def _single_process_env() -> None:
    """A world of one for torch.distributed when no launcher set the environment."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.comm == "torch" and "RANK" not in os.environ:
        if args.nproc is not None and args.nproc > 1:
            _launch_under_torchrun(argv, args.nproc)
        _single_process_env()
    comm = init_comm(args.comm)
    try:
        _warn_if_restarts_share_the_store(comm.rank)
        if args.nproc is not None and args.nproc != comm.world_size:
            raise SystemExit(f"gpuforge train: --nproc {args.nproc} but the launcher started {comm.world_size} "
                             "processes")
        run = _run_model_parallel if args.strategy in MODEL_PARALLEL else \
            _run_sequence_or_expert_parallel if args.strategy in SEQUENCE_AND_EXPERT else _run_data_parallel
        return run(comm, args)
    finally:
        comm.destroy()
