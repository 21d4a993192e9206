"""Step time of our context parallelism beside PyTorch's (torch.distributed.tensor.experimental.context_parallel),
on gloo CPU process groups (a benchmark, not a test).

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m gpuforge.profiling.cp_step_time \
        --out profiling/results/cpu-context-parallel

Rows: causal attention forward + backward of (B, H, S, D) with the sequence over every rank — our ring
attention (zigzag), our Ulysses, PyTorch's context_parallel around SDPA — and one training step (forward,
backward, gradient all-reduce, AdamW) of a small TinyLlama with ring attention and with Ulysses. One
process's attention over the whole sequence is the baseline. Each step is timed on every rank after a
barrier; a step's time is the slowest rank's; the table gives the median with p20/p80. A contender that
cannot run here is a row with the error that stopped it: torch 2.13's context_parallel replaces only the CUDA
SDPA kernels (flash, efficient, cuDNN) by its ring; on CPU tensors SDPA's CPU flash kernel has no sharding
strategy (NotImplementedError), and forcing the math kernel fails too (an add of a plain Tensor and a DTensor).
Rank 0 prints the table and writes results.json and report.md.
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
import torch.nn.functional as F

from gpuforge.kernels.flash_attention import flash_attention_with_lse
from gpuforge.models.vol2_llm import TinyLlama, TinyLlamaConfig, make_batch
from gpuforge.parallel.comm import GroupComm, init_comm
from gpuforge.parallel.model_parallel.context_parallel import context_parallelize
from gpuforge.parallel.model_parallel.ring_attention import ring_attention, zigzag_shard
from gpuforge.parallel.model_parallel.ulysses import ulysses_attention
from gpuforge.profiling.timing import _summarise as summarise_ms


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpuforge.profiling.cp_step_time", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--out", type=Path, default=None, help="directory for results.json and report.md (rank 0)")
    return p.parse_args(argv)


def _timed(fn, args) -> list[float]:
    """The slowest rank's seconds of each timed call of fn()."""
    times = []
    for i in range(args.warmup + args.steps):
        dist.barrier()
        start = time.perf_counter()
        fn()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.tolist()


def _attention_contenders(comm, args) -> dict:
    gc, n, r = GroupComm(comm), comm.world_size, comm.rank
    g = torch.Generator().manual_seed(0)
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))

    def fwd_bwd(attend, *inputs):
        leaves = [t.detach().requires_grad_() for t in inputs]
        attend(*leaves).sum().backward()

    zig = [zigzag_shard(t, 2, n, r) for t in (q, k, v)]
    part = [t.chunk(n, 2)[r] for t in (q, k, v)]
    return {
        "one process (whole sequence)": lambda: fwd_bwd(
            lambda *t: flash_attention_with_lse(*t, causal=True)[0], q, k, v),
        "ours: ring attention (zigzag)": lambda: fwd_bwd(lambda *t: ring_attention(*t, gc, causal=True), *zig),
        "ours: Ulysses": lambda: fwd_bwd(lambda *t: ulysses_attention(*t, gc, causal=True), *part),
        "torch: context_parallel + SDPA": lambda: _torch_context_parallel(q, k, v),
    }


def _torch_context_parallel(q, k, v) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    buffers = [t.clone() for t in (q, k, v)]  # sharded in place along the sequence on entry
    with context_parallel(mesh, buffers=buffers, buffer_seq_dims=[2, 2, 2]):
        leaves = [t.detach().requires_grad_() for t in buffers]
        F.scaled_dot_product_attention(*leaves, is_causal=True).sum().backward()


def _training_contenders(comm, args) -> dict:
    config = TinyLlamaConfig(dim=args.heads * args.head_dim, n_layers=2, n_heads=args.heads,
                             n_kv_heads=max(1, args.heads // 2), hidden_dim=4 * args.heads * args.head_dim,
                             max_seq_len=args.seq_len)
    out = {}
    for attention in ("ring", "ulysses"):
        torch.manual_seed(0)
        model = context_parallelize(TinyLlama(config), comm, attention=attention)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        x, y = make_batch(0, args.batch, args.seq_len)

        def step(model=model, opt=opt, x=x, y=y):
            opt.zero_grad()
            model.loss(x, y).backward()
            model.allreduce_grads()
            opt.step()
        out[f"ours: TinyLlama step, {attention}"] = step
    return out


def measure(comm, args) -> list[dict]:
    rows = []
    for name, fn in {**_attention_contenders(comm, args), **_training_contenders(comm, args)}.items():
        error = "failed on another rank"
        try:
            fn()
            ok = torch.ones(1)
        except Exception as exc:  # noqa: BLE001 - a contender that cannot run here is reported, not fatal
            ok, error = torch.zeros(1), f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            rows.append({"name": name, "error": error})
            continue
        t = summarise_ms([1e3 * s for s in _timed(fn, args)])
        rows.append({"name": name, "ms": t.median_ms, "p20_ms": t.p20_ms, "p80_ms": t.p80_ms})
    return rows


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Context-parallel step time, ours vs PyTorch ({env['device']}, {env['world_size']} processes, gloo)",
             "", f"Causal attention forward + backward of {env['shape']} (B, H, S, D) float32, the sequence over "
                 f"every rank; TinyLlama {env['model']} training steps. Median of {env['steps']} (slowest rank), "
                 f"p20–p80 in brackets; torch {env['torch']}, 1 thread per rank, {env['cpu_cores']} cores, 1-minute "
                 f"load average {env['load_average_1min'][0]:.1f} before, {env['load_average_1min'][1]:.1f} after.",
             "", "| contender | ms |", "|---|---|"]
    for r in rows:
        cell = f"does not run: {r['error']}" if "error" in r else f"{r['ms']:.2f} [{r['p20_ms']:.2f}–{r['p80_ms']:.2f}]"
        lines.append(f"| {r['name']} | {cell} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    comm = init_comm("torch")
    try:
        if comm.device.type != "cpu":
            raise SystemExit("cp_step_time: runs on gloo CPU process groups (launch with torchrun)")
        load_before = os.getloadavg()[0]
        rows = measure(comm, args)
        if comm.rank == 0:
            env = {"device": f"cpu ({platform.processor() or platform.machine()})", "world_size": comm.world_size,
                   "torch": torch.__version__, "cpu_cores": os.cpu_count(), "steps": args.steps,
                   "shape": [args.batch, args.heads, args.seq_len, args.head_dim],
                   "model": f"dim={args.heads * args.head_dim} layers=2 seq={args.seq_len} batch={args.batch}",
                   "load_average_1min": [load_before, os.getloadavg()[0]]}
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
