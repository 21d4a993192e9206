"""Measured pipeline bubble of interleaved 1F1B, ZB-H1 and DualPipeV (and 1F1B) beside the simulator's, and step times
beside torch.distributed.pipelining's Interleaved1F1B, ZBVZeroBubble and DualPipeV (a benchmark, not a test).

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m gpuforge.profiling.pipeline_bubble \
        --out profiling/results/cpu-pipeline-bubble

Every rank runs the same TinyLlama (float32) cut into p = 2 stages of `--layers` layers on gloo. Each step's
per-op start/end times (PipelineExecutor.timeline, wall clock of one machine) give the measured bubble
(pipeline_sim.measured_result: idle stage-time over stage-time between the step's first start and last end);
the simulator's figure is `simulate` of the same schedule with each action's cost taken from the same step
(a compute op its measured duration, a send's or receive's own time on its stage, every message the step's
median latency; `_costs`), so the difference is what the simulator does not model: the runtime's own overhead between
actions, an order of execution other than the schedule's, a wait the schedule does not have (a thread per
message once cost every send and receive 1-10 ms on this machine: interleaved 1F1B measured 25 points above).
The table gives both (medians over the timed
steps), their difference in points, and the median step time (slowest rank, after a barrier). Rank 0 prints
the table and writes results.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from gpuforge.models.vol2_llm import TinyLlama, TinyLlamaConfig, make_batch
from gpuforge.parallel.comm import init_comm
from gpuforge.parallel.model_parallel.pipeline_runtime import PipelineExecutor, pipeline_split
from gpuforge.parallel.model_parallel.pipeline_schedule import COMPUTE_OPS, make_schedule, placement_of, virtual_stage
from gpuforge.parallel.model_parallel.pipeline_sim import measured_result, simulate

OURS = [("1f1b", 1), ("interleaved-1f1b", 2), ("zb-h1", 1), ("dualpipev", 2)]  # (schedule, model chunks per stage)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m gpuforge.profiling.pipeline_bubble", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per schedule")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def _model(args) -> TinyLlama:
    torch.manual_seed(0)
    return TinyLlama(TinyLlamaConfig(dim=args.dim, n_layers=args.layers, n_heads=4, n_kv_heads=2,
                                     hidden_dim=2 * args.dim, max_seq_len=args.seq_len))


def _timed(step, comm) -> float:
    dist.barrier()
    start = time.perf_counter()
    step()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _costs(events, placement: str = "loop"):
    """The simulator's costs of each action, from one measured step: (cost, stage_time) for `simulate`.

    A compute op costs its own duration. A send occupies its stage for its call's duration; a receive, once its
    message is there, for the stage's median receive of a message already sent when the receive was posted (the
    copy out; ~0.1-0.3 ms). Every message takes one latency, the median over the receives that waited for their
    message of (receive end - its own time - send start): one number for the step, not fitted message by
    message, so a wait the runtime adds somewhere shows up as a difference."""
    p = 1 + max(e.stage for e in events)
    own = {(e.stage, e.action): e.end - e.start for e in events if e.action.op in COMPUTE_OPS}
    occupied = {(e.stage, e.action): e.end - e.start for e in events if e.action.op in ("SEND_F", "SEND_B")}
    vs = lambda e: virtual_stage(e.stage, e.action.chunk, p, placement)  # noqa: E731
    recvs = {(e.action.op, e.action.microbatch, vs(e)): e for e in events if e.action.op in ("RECV_F", "RECV_B")}
    sends = []
    for e in events:
        if e.action.op in ("SEND_F", "SEND_B"):
            to = vs(e) + (1 if e.action.op == "SEND_F" else -1)
            sends.append((e, recvs[("RECV_" + e.action.op[-1], e.action.microbatch, to)]))
    for stage in range(p):
        queued = [r.end - r.start for s, r in sends if r.stage == stage and s.end <= r.start]
        copy_out = statistics.median(queued) if queued else 0.0
        occupied.update({(r.stage, r.action): copy_out for _, r in sends if r.stage == stage})
    waited = [max(0.0, r.end - occupied[(r.stage, r.action)] - s.start) for s, r in sends if r.start < s.end]
    latency = statistics.median(waited) if waited else 0.0
    own.update({(s.stage, s.action): latency for s, _ in sends})
    return (lambda stage, action: own.get((stage, action), 0.0),
            lambda stage, action: occupied.get((stage, action), 0.0))


def measure_ours(comm, args, schedule: str, chunks: int) -> dict:
    stage = pipeline_split(_model(args), comm.world_size, chunks, placement_of(schedule))[comm.rank]
    executor = PipelineExecutor(stage, comm, schedule=schedule, num_microbatches=args.microbatches)
    x, y = make_batch(0, args.batch, args.seq_len)
    times, measured, simulated = [], [], []
    for i in range(args.warmup + args.steps):
        t = _timed(lambda: executor.step(x, y), comm)
        stage.zero_grad()
        timelines = [None] * comm.world_size
        dist.all_gather_object(timelines, executor.timeline)
        if i < args.warmup:
            continue
        events = [e for timeline in timelines for e in timeline]
        sim = simulate(make_schedule(schedule, comm.world_size, args.microbatches, chunks),
                       *_costs(events, placement_of(schedule)), placement=placement_of(schedule))
        times.append(t)
        measured.append(measured_result(events).bubble_fraction)
        simulated.append(sim.bubble_fraction)
    return {"schedule": schedule, "chunks": chunks, "step_ms": 1e3 * statistics.median(times),
            "measured_bubble": statistics.median(measured), "simulated_bubble": statistics.median(simulated)}


class _Chunk(nn.Module):
    """Layers [lo, hi) of the TinyLlama, with the embedding before layer 0 and norm + head after the last."""

    def __init__(self, model: TinyLlama, lo: int, hi: int):
        super().__init__()
        self.first, self.last = lo == 0, hi == len(model.layers)
        self.emb = model.tok_embeddings if self.first else None
        self.blocks = nn.ModuleList(model.layers[lo:hi])
        self.norm = model.norm if self.last else None
        self.head = nn.Parameter(model.tok_embeddings.weight.detach().clone()) if self.last else None

    def forward(self, h):
        h = self.emb(h) if self.first else h
        for block in self.blocks:
            h = block(h)
        return F.linear(self.norm(h), self.head) if self.last else h


def measure_torch(comm, args, name: str) -> dict:
    """torch.distributed.pipelining's schedule `name` on the same model, 2 stages per rank."""
    from torch.distributed import pipelining

    p, rank = comm.world_size, comm.rank
    n_stages = 2 * p
    per = args.layers // n_stages
    # interleaved: rank r holds stages r and r + p; ZBV and DualPipeV (V shape): stages r and 2p - 1 - r
    mine = [rank, rank + p] if name == "Interleaved1F1B" else [rank, n_stages - 1 - rank]
    model = _model(args)
    stages = [pipelining.PipelineStage(_Chunk(model, s * per, (s + 1) * per), s, n_stages, torch.device("cpu"))
              for s in mine]
    loss_fn = lambda logits, targets: F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # noqa: E731
    cls = getattr(pipelining, f"Schedule{name}")
    schedule = cls(stages, n_microbatches=args.microbatches, loss_fn=loss_fn)
    x, y = make_batch(0, args.batch, args.seq_len)

    def step():
        kwargs = {"target": y, "losses": []} if any(s.is_last for s in stages) else {}
        schedule.step(x, **kwargs) if any(s.is_first for s in stages) else schedule.step(**kwargs)

    times = [_timed(step, comm) for _ in range(args.warmup + args.steps)][args.warmup:]
    return {"schedule": f"torch {name}", "chunks": 2, "step_ms": 1e3 * statistics.median(times),
            "measured_bubble": None, "simulated_bubble": None}


def markdown(env: dict, rows: list[dict]) -> str:
    lines = [f"# Pipeline bubble, measured vs simulated ({env['device']}, p = {env['world_size']})", "",
             f"TinyLlama {env['model']}, batch {env['batch']} × {env['seq_len']} tokens in {env['microbatches']} "
             f"micro-batches, float32, forward + backward (no optimizer step); medians of {env['steps']} steps "
             f"after {env['warmup']} warm-up; torch {env['torch']}, 1 thread per rank, {env['cpu_cores']} cores, "
             f"load average {env['load'][0]:.1f} before, {env['load'][1]:.1f} after. Simulated: the same schedule "
             "with each action's measured cost of the same step (compute: its duration; send/receive: its own time on "
             "the stage; every message: the step's median latency).", "",
             "| schedule | chunks/stage | step ms | measured bubble | simulated bubble | diff (points) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['schedule']} | | did not run: {r['error']} | | | |")
        elif r["measured_bubble"] is None:
            lines.append(f"| {r['schedule']} | {r['chunks']} | {r['step_ms']:.1f} | – | – | – |")
        else:
            diff = 100 * (r["measured_bubble"] - r["simulated_bubble"])
            lines.append(f"| {r['schedule']} | {r['chunks']} | {r['step_ms']:.1f} | {r['measured_bubble']:.1%} | "
                         f"{r['simulated_bubble']:.1%} | {diff:+.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    comm = init_comm("torch")
    try:
        load = os.getloadavg()[0]
        rows = [measure_ours(comm, args, s, v) for s, v in OURS]
        for name in ("Interleaved1F1B", "ZBVZeroBubble", "DualPipeV"):
            try:
                rows.append(measure_torch(comm, args, name))
            except Exception as err:  # noqa: BLE001 - recorded in the table: why PyTorch's did not run here
                rows.append({"schedule": f"torch {name}", "error": f"{type(err).__name__}: {err}"[:200]})
        if comm.rank == 0:
            config = _model(args).config
            env = {"device": f"CPU ({platform.machine()}, {os.cpu_count()} cores), gloo", "world_size": comm.world_size,
                   "torch": torch.__version__, "cpu_cores": os.cpu_count(), "load": [load, os.getloadavg()[0]],
                   "model": f"dim={config.dim} layers={config.n_layers} heads={config.n_heads}/{config.n_kv_heads}",
                   "batch": args.batch, "seq_len": args.seq_len, "microbatches": args.microbatches,
                   "steps": args.steps, "warmup": args.warmup}
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
