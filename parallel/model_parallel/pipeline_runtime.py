"""Pipeline parallelism on real processes: split a TinyLlama into stages and run a schedule with send/recv.

`pipeline_split(model, num_stages, num_chunks=1, placement="loop")` cuts the transformer blocks into
num_stages · num_chunks contiguous, nearly equal runs, the virtual stages; stage s holds virtual stages c·p + s
for c < num_chunks (its model chunks; one chunk except under interleaved 1F1B, where the layers must divide
evenly), or under DualPipeV's "v" placement s and 2p − 1 − s. The first virtual stage also owns the token
embedding, the last the final norm, the (tied) output head and the loss. The tied weight therefore lives on
two stages: after the backward pass the first and last stage exchange its gradient and both add it
(Megatron's embedding group), so their copies stay equal; in the V both are stage 0, which holds one copy.

`PipelineExecutor(stage, comm, schedule, num_microbatches)` executes this stage's action list from
`pipeline_schedule`: activations go downstream and activation gradients upstream through the communicator (sends
non-blocking, waited for at the end of the step: gloo's blocking send would wait for its receive and 1F1B would
deadlock; every receive of the step posted at its start, in action order, and waited for at its action, so each
transfer runs while the stage computes), the loss is computed on the last stage only, each micro-batch's loss is
divided by m, so the gradients equal single-process gradient accumulation over the m micro-batches of the batch. A
stage with mixture-of-experts layers adds their load-balancing losses (/ m) to each micro-batch's backward and
keeps their sum in `aux_loss` (the step's loss is then the last stage's plus every stage's `aux_loss`). Under ZB-H1
a backward is B then W (pipeline_backward.py; a W that directly follows its own B, with no send between, runs in
the same pass); the first virtual stage cuts its graph after the embedding (its B ends at the embedding output, its
W computes the embedding's gradient from there), so a weight tied between embedding and head is never reached twice
by one W.
The stage's rank in `comm` is its stage index.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.parallel.comm.group import as_group_comm
from gpuforge.parallel.model_parallel.pipeline_backward import Recorded, SplitBackward, direct_parameters
from gpuforge.parallel.model_parallel.pipeline_schedule import (
    CHUNKED,
    SCHEDULES,
    Action,
    make_schedule,
    placement_of,
    virtual_stage,
)
from gpuforge.parallel.model_parallel.pipeline_sim import Event


def split_layers(n_layers: int, num_stages: int) -> list[range]:
    """Contiguous runs of layers, the first n_layers % num_stages stages getting one more."""
    if num_stages < 1:
        raise ValueError(f"num_stages must be >= 1, got {num_stages}")
    if num_stages > n_layers:
        raise ValueError(f"more pipeline stages ({num_stages}) than layers ({n_layers})")
    base, extra = divmod(n_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return [range(bounds[s], bounds[s + 1]) for s in range(num_stages)]


def split_chunks(n_layers: int, num_stages: int, num_chunks: int = 1, placement: str = "loop") -> list[list[range]]:
    """For each stage, the layer runs of its chunks (virtual stages by `placement`, pipeline_schedule.py: c·p + s
    or DualPipeV's V). Several chunks need n_layers divisible by num_stages · num_chunks: the interleaved and
    V schedules assume equal virtual stages."""
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
    if num_chunks > 1 and n_layers % (num_stages * num_chunks):
        raise ValueError(f"n_layers ({n_layers}) must be divisible by pp · virtual stages = {num_stages} · "
                         f"{num_chunks} for the interleaved schedule")
    if placement == "v" and num_chunks != 2:
        raise ValueError(f"num_chunks: the V placement holds 2 model chunks per stage, got {num_chunks}")
    runs = split_layers(n_layers, num_stages * num_chunks)
    return [[runs[virtual_stage(s, c, num_stages, placement)] for c in range(num_chunks)] for s in range(num_stages)]


class PipelineStage(nn.Module):
    """Stage `index` of `num_stages` with `num_chunks` model chunks: embedding (first virtual stage), its
    blocks, norm + tied head + loss (last virtual stage).

    `model` is a TinyLlama or a `TensorParallelLM` (3D: each stage is also tensor-parallel)."""

    def __init__(self, model: nn.Module, index: int, num_stages: int, num_chunks: int = 1, placement: str = "loop"):
        super().__init__()
        self.index, self.num_stages, self.num_chunks, self.placement = index, num_stages, num_chunks, placement
        self.virtual = [virtual_stage(index, c, num_stages, placement) for c in range(num_chunks)]
        last = num_stages * num_chunks - 1
        self.is_first, self.is_last = 0 in self.virtual, last in self.virtual  # both: DualPipeV's first stage
        self.config = model.config
        self.comm = getattr(model, "comm", None)  # the TP communicator of a TensorParallelLM
        runs = split_chunks(len(model.layers), num_stages, num_chunks, placement)[index]
        self.layer_range = [i for run in runs for i in run]  # global layer index of each of self.layers
        bounds = [0]
        for run in runs:
            bounds.append(bounds[-1] + len(run))
        self.chunk_bounds = list(zip(bounds, bounds[1:], strict=False))
        self.layers = nn.ModuleList(model.layers[i] for i in self.layer_range)
        self.tok_embeddings = model.tok_embeddings if self.is_first else None
        if self.is_last:
            self.norm = model.norm
            emb = model.tok_embeddings.weight
            self.head_weight = emb if self.is_first else nn.Parameter(emb.detach().clone())
        self._tp_head = getattr(model, "head", None)
        self._tp_loss = getattr(model, "output_loss", None)

    def tied_weight(self) -> nn.Parameter | None:
        """The embedding (first stage) or head (last stage) weight shared between the first and last stage."""
        return self.tok_embeddings.weight if self.is_first else (self.head_weight if self.is_last else None)

    def holds_first(self, chunk: int) -> bool:
        return self.virtual[chunk] == 0

    def holds_last(self, chunk: int) -> bool:
        return self.virtual[chunk] == self.num_stages * self.num_chunks - 1

    def local_input(self, chunk: int) -> int | None:
        """The chunk of this stage whose output is `chunk`'s input (the V's turn), or None: it comes by message."""
        before = self.virtual[chunk] - 1
        return self.virtual.index(before) if self.placement == "v" and before in self.virtual else None

    def forward(self, x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        return self.body(self.tok_embeddings(x) if self.holds_first(chunk) else x, chunk)

    def body(self, h: torch.Tensor, chunk: int = 0) -> torch.Tensor:
        """The chunk after the embedding: its blocks, then (last virtual stage) norm and head -> logits."""
        lo, hi = self.chunk_bounds[chunk]
        for layer, i in zip(self.layers[lo:hi], self.layer_range[lo:hi], strict=True):
            h = layer(h, 0, None, i)
        if not self.holds_last(chunk):
            return h
        h = self.norm(h)
        return self._tp_head(h, self.head_weight) if self._tp_head else F.linear(h, self.head_weight)

    def aux_loss(self, chunk: int = 0) -> torch.Tensor | None:
        """The mixture-of-experts load-balancing losses of the chunk's last forward (None: no MoE layers)."""
        lo, hi = self.chunk_bounds[chunk]
        losses = [layer.feed_forward.aux_loss for layer in self.layers[lo:hi]
                  if hasattr(getattr(layer, "feed_forward", None), "aux_loss")]
        return sum(losses) if losses else None

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._tp_loss:
            return self._tp_loss(logits, targets)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def pipeline_split(model: nn.Module, num_stages: int, num_chunks: int = 1,
                   placement: str = "loop") -> list[PipelineStage]:
    """All stages of `model` (each rank keeps the one at its stage index); `placement` "v" for DualPipeV."""
    split_chunks(len(model.layers), num_stages, num_chunks, placement)
    return [PipelineStage(model, s, num_stages, num_chunks, placement) for s in range(num_stages)]


def check_schedule(schedule: str, num_stages: int, num_microbatches: int, num_chunks: int = 1) -> None:
    """Raise ValueError (the same on every rank, before any message) for a schedule these sizes cannot run."""
    make_schedule(schedule, num_stages, num_microbatches, num_chunks)


class PipelineExecutor:
    """Run one training step of a schedule on this rank's stage; gradients accumulate into its parameters."""

    def __init__(self, stage: PipelineStage, comm, group=None, *, schedule: str = "1f1b",
                 num_microbatches: int = 1, activation_shape_fn=None):
        self.stage, self.comm, self.m = stage, as_group_comm(comm, group), num_microbatches
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {sorted(SCHEDULES)}, got {schedule!r}")
        if stage.num_chunks > 1 and schedule not in CHUNKED:
            raise ValueError(f"schedule: a stage of {stage.num_chunks} model chunks runs {CHUNKED}, not {schedule!r}")
        if stage.placement != placement_of(schedule):
            raise ValueError(f"schedule {schedule!r} places its chunks {placement_of(schedule)!r}; the stage was cut "
                             f"for {stage.placement!r} (pipeline_split(..., placement=placement_of(schedule)))")
        if self.comm.size != stage.num_stages or self.comm.rank != stage.index:
            raise ValueError(f"stage {stage.index} of {stage.num_stages} needs a group of {stage.num_stages} ranks "
                             f"with it at rank {stage.index}; got rank {self.comm.rank} of {self.comm.size}")
        self.actions = make_schedule(schedule, stage.num_stages, num_microbatches, stage.num_chunks)[stage.index]
        split = any(a.op == "W" for a in self.actions)
        if split and any(
                getattr(layer.forward, "checkpoint_policy", None) == "selective" for layer in stage.layers):
            raise ValueError(f"schedule {schedule!r} splits each backward into B and W, two backward passes over a "
                             "block, and torch's selective activation checkpointing allows one: checkpoint the "
                             "blocks 'full' or use another schedule")
        config = stage.config
        self.dtype = next(stage.parameters()).dtype
        # every stage cut from the same model, run with the same schedule (a layer-count or hidden-size
        # mismatch would otherwise hang in a receive of the wrong size)
        self.comm.check_same_config("PipelineExecutor", next(stage.parameters()).device, schedule=schedule,
                                    num_microbatches=num_microbatches, num_chunks=stage.num_chunks,
                                    dtype=self.dtype,
                                    **{k: getattr(config, k) for k in ("n_layers", "dim", "vocab_size", "n_heads",
                                                                       "n_kv_heads", "hidden_dim")})
        self.split = SplitBackward(stage) if split else None
        # a B directly followed by its own W runs as one backward pass (ZB-H1's first stage, DualPipeV's first
        # chunk and its turn): splitting it would only traverse the graph twice
        self._fused = {i for i, (a, b) in enumerate(zip(self.actions, self.actions[1:]))
                       if a.op == "B" and b == Action("W", a.microbatch, None, a.chunk)}
        self._local = [stage.local_input(c) for c in range(stage.num_chunks)]
        if self.split is not None:
            self._own = direct_parameters(stage)
            missed = [n for n, p in stage.named_parameters()
                      if p.requires_grad and id(p) not in self.split.covered | {id(q) for q in self._own}]
            if missed:
                raise ValueError(f"stage: parameters {missed} are not owned directly by a module; W cannot "
                                 "compute their gradients")
        self.activation_shape_fn = activation_shape_fn or (lambda tokens: (*tokens.shape, stage.config.dim))

    def _forward(self, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, list[Recorded] | None]:
        """The chunk's output (logits on the last virtual stage) and, under a split backward, what W needs."""
        if self.split is None:
            return self.stage(x, chunk), None
        with self.split.recording() as recorded:
            if self.stage.holds_first(chunk):
                embedded = self.stage.tok_embeddings(x)
                x = embedded.detach().requires_grad_()  # the cut: B ends here, W of the embedding starts here
                recorded[-1].wrt = x
            out = self.stage.body(x, chunk)
        if self.stage.holds_last(chunk) and self._own:
            recorded.append(Recorded(self._own, out, out))
        return out, list(recorded)

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of the whole batch as m micro-batches. Returns the mean loss on the last
        stage, None elsewhere. Every stage gets the same (inputs, targets); it uses only what it needs."""
        if inputs.shape[0] % self.m:
            raise ValueError(f"batch size {inputs.shape[0]} is not divisible by num_microbatches {self.m}")
        xs, ys = inputs.chunk(self.m), targets.chunk(self.m)
        shape = self.activation_shape_fn(xs[0])
        received, outputs, out_grads, saved, weight_work, pending, losses = {}, {}, {}, {}, {}, [], []
        aux, self.aux_loss = {}, torch.zeros((), dtype=torch.float64)
        self.timeline: list[Event] = []  # this stage's actions of the step, wall-clock seconds (time.time)
        # every receive of the step posted now, in action order (the order the peers send in): a transfer runs
        # as soon as its send is posted too, not when this stage reaches the receive (gloo moves no data until
        # both sides have posted)
        posted = {i: (torch.empty(shape, dtype=self.dtype), a.peer) for i, a in enumerate(self.actions)
                  if a.op in ("RECV_F", "RECV_B")}
        posted = {i: (buffer, self.comm.irecv(buffer, peer)) for i, (buffer, peer) in posted.items()}
        for i, a in enumerate(self.actions):
            key = (a.microbatch, a.chunk)
            start = time.time()
            local = self._local[a.chunk]
            if a.op == "F" and local is not None:  # the V's turn: chunk `local`'s output, cut for B
                received[key] = outputs[(a.microbatch, local)].detach().requires_grad_()
            if a.op in ("RECV_F", "RECV_B"):
                buffer, work = posted.pop(i)
                work.wait()
            if a.op == "RECV_F":
                received[key] = buffer.requires_grad_()
            elif a.op == "F":
                first = self.stage.holds_first(a.chunk)
                out, saved[key] = self._forward(xs[a.microbatch] if first else received[key], a.chunk)
                balance = self.stage.aux_loss(a.chunk)
                if balance is not None:
                    aux[key] = balance / self.m
                    self.aux_loss = self.aux_loss + aux[key].detach().double()
                if self.stage.holds_last(a.chunk):
                    out = self.stage.loss(out, ys[a.microbatch]) / self.m
                    losses.append(out.detach())
                outputs[key] = out
            elif a.op == "SEND_F":
                pending.append(self.comm.isend(outputs[key].detach().contiguous(), a.peer))
            elif a.op == "RECV_B":
                out_grads[key] = buffer
            elif a.op == "B":
                out, grad = outputs.pop(key), out_grads.pop(key, None)
                roots, root_grads = ([out, aux.pop(key)], [grad, None]) if key in aux else ([out], [grad])
                if self.split is None or i in self._fused:
                    torch.autograd.backward(roots, root_grads)
                    if self.split is not None:  # W's part too: the embedding below the first chunk's cut
                        for r in saved.pop(key):
                            if r.wrt is not r.output and r.wrt.grad is not None:
                                torch.autograd.backward(r.output, r.wrt.grad)
                else:
                    inputs_ = [received[key]] if key in received else []
                    input_grads, grads = self.split.backward_input(roots, root_grads, inputs_, saved[key])
                    if inputs_:
                        received[key].grad = input_grads[0]
                    weight_work[key] = grads
                if local is not None:
                    out_grads[(a.microbatch, local)] = received.pop(key).grad
            elif a.op == "SEND_B":
                pending.append(self.comm.isend(received.pop(key).grad.contiguous(), a.peer))
            elif a.op == "W" and i - 1 not in self._fused:  # a fused W ran with its B
                self.split.backward_weight(saved.pop(key), weight_work.pop(key))
            self.timeline.append(Event(self.stage.index, a, start, time.time()))
        for handle in pending:
            handle.wait()
        self.sync_tied_grads()
        return torch.stack(losses).sum() if losses else None

    def sync_tied_grads(self) -> None:
        """First and last stage swap the tied embedding/head gradient and both add it."""
        if self.stage.is_first == self.stage.is_last:  # one copy here (both), or none (neither)
            return
        w = self.stage.tied_weight()
        peer = self.stage.num_stages - 1 if self.stage.is_first else 0
        mine = w.grad.detach().clone() if w.grad is not None else torch.zeros_like(w)
        handle = self.comm.isend(mine, peer)
        theirs = self.comm.recv(torch.empty_like(mine), peer)
        handle.wait()
        first, last = (mine, theirs) if self.stage.is_first else (theirs, mine)
        w.grad = first + last  # same order of addition on both stages: bitwise equal copies
