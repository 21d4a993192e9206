"""Pipeline parallelism on real processes: split a TinyLlama into stages and run a schedule with send/recv.

`pipeline_split(model, num_stages)` cuts the transformer blocks into contiguous, nearly equal runs; the first
stage also owns the token embedding, the last the final norm, the (tied) output head and the loss. The tied
weight therefore lives on two stages: after the backward pass the first and last stage exchange its gradient
and both add it (Megatron's embedding group), so their copies stay equal.

`PipelineExecutor(stage, comm, schedule, num_microbatches)` executes this stage's action list from
`pipeline_schedule`: activations go downstream and activation gradients upstream through the communicator
(sends non-blocking, waited for at the end of the step: gloo's blocking send would wait for its receive and
1F1B would deadlock), the loss is computed on the last stage only, each micro-batch's loss is divided by m,
so the gradients equal single-process gradient accumulation over the m micro-batches of the batch.
The stage's rank in `comm` is its stage index.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.parallel.comm.group import as_group_comm
from gpuforge.parallel.model_parallel.pipeline_schedule import make_schedule
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


class PipelineStage(nn.Module):
    """Stage `index` of `num_stages`: embedding (first), its blocks, norm + tied head + loss (last).

    `model` is a TinyLlama or a `TensorParallelLM` (3D: each stage is also tensor-parallel)."""

    def __init__(self, model: nn.Module, index: int, num_stages: int):
        super().__init__()
        self.index, self.num_stages = index, num_stages
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.config = model.config
        self.comm = getattr(model, "comm", None)  # the TP communicator of a TensorParallelLM
        self.layer_range = split_layers(len(model.layers), num_stages)[index]
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.is_first else x
        for layer, i in zip(self.layers, self.layer_range, strict=True):
            h = layer(h, 0, None, i)
        if not self.is_last:
            return h
        h = self.norm(h)
        return self._tp_head(h, self.head_weight) if self._tp_head else F.linear(h, self.head_weight)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self._tp_loss:
            return self._tp_loss(logits, targets)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def pipeline_split(model: nn.Module, num_stages: int) -> list[PipelineStage]:
    """All stages of `model` (each rank keeps the one at its stage index)."""
    split_layers(len(model.layers), num_stages)
    return [PipelineStage(model, s, num_stages) for s in range(num_stages)]


class PipelineExecutor:
    """Run one training step of a schedule on this rank's stage; gradients accumulate into its parameters."""

    def __init__(self, stage: PipelineStage, comm, group=None, *, schedule: str = "1f1b",
                 num_microbatches: int = 1, activation_shape_fn=None):
        self.stage, self.comm, self.m = stage, as_group_comm(comm, group), num_microbatches
        if schedule not in ("gpipe", "1f1b"):
            raise ValueError(f"the executor runs 'gpipe' and '1f1b' (one model chunk per stage), not {schedule!r}")
        if self.comm.size != stage.num_stages or self.comm.rank != stage.index:
            raise ValueError(f"stage {stage.index} of {stage.num_stages} needs a group of {stage.num_stages} ranks "
                             f"with it at rank {stage.index}; got rank {self.comm.rank} of {self.comm.size}")
        config = stage.config
        self.dtype = next(stage.parameters()).dtype
        # every stage cut from the same model, run with the same schedule (a layer-count or hidden-size
        # mismatch would otherwise hang in a receive of the wrong size)
        self.comm.check_same_config("PipelineExecutor", next(stage.parameters()).device, schedule=schedule,
                                    num_microbatches=num_microbatches, dtype=self.dtype,
                                    **{k: getattr(config, k) for k in ("n_layers", "dim", "vocab_size", "n_heads",
                                                                       "n_kv_heads", "hidden_dim")})
        self.actions = make_schedule(schedule, stage.num_stages, num_microbatches)[stage.index]
        self.activation_shape_fn = activation_shape_fn or (lambda tokens: (*tokens.shape, stage.config.dim))

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of the whole batch as m micro-batches. Returns the mean loss on the last
        stage, None elsewhere. Every stage gets the same (inputs, targets); it uses only what it needs."""
        if inputs.shape[0] % self.m:
            raise ValueError(f"batch size {inputs.shape[0]} is not divisible by num_microbatches {self.m}")
        xs, ys = inputs.chunk(self.m), targets.chunk(self.m)
        shape = self.activation_shape_fn(xs[0])
        received, outputs, out_grads, pending, losses = {}, {}, {}, [], []
        self.timeline: list[Event] = []  # this stage's actions of the step, wall-clock seconds (time.time)
        for a in self.actions:
            mb = a.microbatch
            start = time.time()
            if a.op == "RECV_F":
                buffer = torch.empty(shape, dtype=self.dtype)
                received[mb] = self.comm.recv(buffer, a.peer).requires_grad_()
            elif a.op == "F":
                out = self.stage(xs[mb] if self.stage.is_first else received[mb])
                if self.stage.is_last:
                    out = self.stage.loss(out, ys[mb]) / self.m
                    losses.append(out.detach())
                outputs[mb] = out
            elif a.op == "SEND_F":
                pending.append(self.comm.isend(outputs[mb].detach().contiguous(), a.peer))
            elif a.op == "RECV_B":
                out_grads[mb] = self.comm.recv(torch.empty(shape, dtype=self.dtype), a.peer)
            elif a.op == "B":
                out = outputs.pop(mb)
                out.backward(None if self.stage.is_last else out_grads.pop(mb))
            elif a.op == "SEND_B":
                pending.append(self.comm.isend(received.pop(mb).grad.contiguous(), a.peer))
            self.timeline.append(Event(self.stage.index, a, start, time.time()))
        for handle in pending:
            handle.wait()
        self.sync_tied_grads()
        return torch.stack(losses).sum() if losses else None

    def sync_tied_grads(self) -> None:
        """First and last stage swap the tied embedding/head gradient and both add it."""
        if self.stage.num_stages == 1 or not (self.stage.is_first or self.stage.is_last):
            return
        w = self.stage.tied_weight()
        peer = self.stage.num_stages - 1 if self.stage.is_first else 0
        mine = w.grad.detach().clone() if w.grad is not None else torch.zeros_like(w)
        handle = self.comm.isend(mine, peer)
        theirs = self.comm.recv(torch.empty_like(mine), peer)
        handle.wait()
        first, last = (mine, theirs) if self.stage.is_first else (theirs, mine)
        w.grad = first + last  # same order of addition on both stages: bitwise equal copies
