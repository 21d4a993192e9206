"""Step time of our data-parallel strategies beside PyTorch's, on one small TinyLlama (a benchmark, not a test).

    torchrun --standalone --nproc_per_node 2 -m gpuforge.profiling.parallel_step_time \
        --out profiling/results/cpu-parallel

Pairs (parallel/training/data_parallel.py): ddp ↔ torch DDP, zero1 ↔ torch DDP + ZeroRedundancyOptimizer, zero2 ↔
fully_shard(reshard_after_forward=False), zero3 ↔ fully_shard. Every trainer starts from the same weights
and sees the same batches; the steps are interleaved (step k of every trainer, then step k + 1), so a change
in machine load hits all of them alike. A step (forward, backward, clip, AdamW) is timed on every rank
after a barrier, and the step's time is the slowest rank's; the table gives the median with p20/p80 and
ours/theirs (the target: ≤ 1.2, at most 20% slower than PyTorch's own). Rank 0 prints the table and writes
results.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist

from gpuforge.models.vol2_llm import Block, TinyLlama, TinyLlamaConfig, loss_fn, make_batch
from gpuforge.parallel.comm import init_comm
from gpuforge.parallel.training.data_parallel import OURS, THEIRS, DataParallelTrainer
from gpuforge.parallel.training.gathered_loss import DataParallelLoss
from gpuforge.profiling.timing import _summarise as summarise_ms  # median, p20, p80 (inclusive quantiles)

TARGET_RATIO = 1.2


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpuforge.profiling.parallel_step_time",
                                description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed steps per trainer")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--out", type=Path, default=None, help="directory for results.json and report.md (rank 0)")
    return p.parse_args(argv)


def _config(args) -> TinyLlamaConfig:
    return TinyLlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2, hidden_dim=2 * args.dim,
                           max_seq_len=args.seq_len)


def _trainer(strategy, comm, args) -> DataParallelTrainer:
    torch.manual_seed(0)
    model = TinyLlama(_config(args)).to(getattr(torch, args.dtype))
    return DataParallelTrainer(strategy, DataParallelLoss(model, loss_fn, comm), comm, lr=1e-3, auto_wrap=(Block,))


def measure(comm, args) -> dict[str, list[float]]:
    """strategy -> the slowest rank's seconds for each timed step."""
    names = [name for ours in OURS for name in (ours, THEIRS[ours])]
    trainers = {name: _trainer(name, comm, args) for name in names}
    times = {name: [] for name in names}
    for step in range(args.warmup + args.steps):
        full = make_batch(step, args.batch * comm.world_size, seq_len=args.seq_len)
        batch = tuple(t.chunk(comm.world_size)[comm.rank] for t in full)
        for name, trainer in trainers.items():
            dist.barrier()
            start = time.perf_counter()
            trainer.step([batch], max_norm=1.0)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    for name in names:
        slowest = torch.tensor(times[name], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        times[name] = slowest.tolist()
    return times


def summarise(times: dict[str, list[float]]) -> list[dict]:
    rows = []
    for ours in OURS:
        row = {"strategy": ours, "theirs": THEIRS[ours]}
        for side, name in (("ours", ours), ("theirs", THEIRS[ours])):
            t = summarise_ms([1e3 * s for s in times[name]])
            row |= {f"{side}_ms": t.median_ms, f"{side}_p20_ms": t.p20_ms, f"{side}_p80_ms": t.p80_ms}
        row["ratio"] = row["ours_ms"] / row["theirs_ms"]
        row["within_target"] = row["ratio"] <= TARGET_RATIO
        rows.append(row)
    return rows


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Data-parallel step time, ours vs PyTorch ({env['device']}, {env['world_size']} processes, "
             f"{env['backend']})", "",
             f"TinyLlama {env['model']}, {env['batch_per_rank']} × {env['seq_len']} tokens per rank, {env['dtype']}, "
             f"AdamW + clipping; median of {env['steps']} steps (slowest rank), p20–p80 in brackets; torch "
             f"{env['torch']}, {env['threads_per_rank']} thread(s) per rank, {env['cpu_cores']} cores, 1-minute load "
             f"average {env['load_average_1min'][0]:.1f} before and {env['load_average_1min'][1]:.1f} after. "
             f"Target: ours/theirs ≤ {TARGET_RATIO}.",
             "", "| ours | ms | theirs | ms | ours/theirs |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['strategy']} | {r['ours_ms']:.2f} [{r['ours_p20_ms']:.2f}–{r['ours_p80_ms']:.2f}] | "
                     f"{r['theirs']} | {r['theirs_ms']:.2f} [{r['theirs_p20_ms']:.2f}–{r['theirs_p80_ms']:.2f}] | "
                     f"{r['ratio']:.2f}{'' if r['within_target'] else ' (over target)'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    comm = init_comm("torch")
    try:
        if comm.kind != "torch" or comm.device.type != "cpu":
            raise SystemExit("parallel_step_time: runs on gloo CPU process groups (launch with torchrun)")
        load_before = os.getloadavg()[0]
        times = measure(comm, args)
        if comm.rank == 0:
            config = _config(args)
            env = {"device": f"cpu ({platform.processor() or platform.machine()})", "world_size": comm.world_size,
                   "backend": "gloo", "torch": torch.__version__, "threads_per_rank": torch.get_num_threads(),
                   "model": f"dim={config.dim} layers={config.n_layers} heads={config.n_heads}/{config.n_kv_heads} "
                            f"hidden={config.hidden_dim} vocab={config.vocab_size}",
                   "params": sum(p.numel() for p in TinyLlama(config).parameters()),
                   "cpu_cores": os.cpu_count(), "load_average_1min": [load_before, os.getloadavg()[0]],
                   "batch_per_rank": args.batch, "seq_len": args.seq_len, "dtype": args.dtype, "steps": args.steps,
                   "warmup": args.warmup}
            rows = summarise(times)
            report = markdown(env, rows)
            print(report, flush=True)
            if args.out is not None:
                args.out.mkdir(parents=True, exist_ok=True)
                (args.out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
                (args.out / "report.md").write_text(report)
        comm.barrier()
    finally:
        comm.destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
