"""Trainers for context parallelism (dp × cp, TinyLlama) and expert parallelism (ep over dp, TinyMoE), and the
`cp` / `ep` runs of `gpuforge train` with their single-process oracles.

`ContextParallelTrainer`: each DP rank takes its slice of the global batch, each CP rank of the DP rank its
positions of the sequence (ring attention or Ulysses); gradients are summed over CP, then averaged over DP,
so every rank holds the whole model's gradient and clips it locally (torch's rule).
`ExpertParallelTrainer`: each DP rank takes its slice; the experts live on the EP group, the replicated
parameters' gradients are averaged over DP, the experts' over the expert-DP group (the ranks holding the
same experts). The global norm counts the replicated parameters once and every expert once (an all-reduce
of the experts' squared norm over the EP group).
"""

from __future__ import annotations

import torch
from torch import nn

from gpuforge.models.vol2_llm import TinyLlama, TinyLlamaConfig, TinyMoE, lm_loss, loss_fn, make_batch
from gpuforge.parallel.comm import GroupComm
from gpuforge.parallel.data_parallel.clipping import scale_to_max_norm_
from gpuforge.parallel.model_parallel.context_parallel import context_parallelize
from gpuforge.parallel.model_parallel.expert_parallel import expert_parallelize
from gpuforge.parallel.model_parallel.mesh import DeviceMesh
from gpuforge.parallel.training.data_parallel import DataParallelTrainer
from gpuforge.parallel.training.gathered_loss import DataParallelLoss
from gpuforge.parallel.training.loop import Trainer, run_steps


def reduce_grads(group: GroupComm, params, op: str = "avg", scale: float | None = None) -> None:
    """Reduce the gradients of `params` over `group` in one all-reduce (`op`), then multiply them by `scale`."""
    params = [p for p in params if p.grad is not None]
    if not params or (group.size == 1 and scale is None):
        return
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    if group.size > 1:
        flat = group.all_reduce(flat, op=op)
    if scale is not None:
        flat = flat * scale
    for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
        p.grad = g.view_as(p).clone()


def _slice(batch, group: GroupComm, index: int):
    inputs, targets = batch
    if inputs.shape[0] % group.size:
        raise ValueError(f"global batch size {inputs.shape[0]} is not divisible by dp={group.size}")
    return inputs.chunk(group.size)[index], targets.chunk(group.size)[index]


class ContextParallelTrainer(Trainer):
    def __init__(self, model: nn.Module, mesh: DeviceMesh, *, attention: str = "ring", lr: float = 1e-3):
        self.mesh, self.dp = mesh, GroupComm(mesh.comm, mesh.dp_group)
        self.forward = context_parallelize(model, GroupComm(mesh.comm, mesh.cp_group), attention=attention)
        self.optimizer = torch.optim.AdamW(self.forward.parameters(), lr=lr)

    def forward_backward(self, batch) -> float:
        loss = self.forward.loss(*_slice(batch, self.dp, self.mesh.dp_index))
        loss.backward()
        self.forward.allreduce_grads()
        reduce_grads(self.dp, self.forward.parameters())
        return self.dp.all_reduce(loss.detach().reshape(1).clone(), op="avg")[0].item()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(self.forward.parameters(), max_norm)


class ExpertParallelTrainer(Trainer):
    def __init__(self, model: nn.Module, mesh: DeviceMesh, *, capacity_factor: float | None = None,
                 lr: float = 1e-3):
        self.mesh = mesh
        self.dp, self.ep = GroupComm(mesh.comm, mesh.dp_group), GroupComm(mesh.comm, mesh.ep_group)
        self.expert_dp = GroupComm(mesh.comm, mesh.expert_dp_group)
        self.forward = expert_parallelize(model, self.ep, capacity_factor=capacity_factor)
        self.replicated = self.forward.replicated_parameters()
        shared = {id(p) for p in self.replicated}
        self.experts = [p for p in self.forward.parameters() if id(p) not in shared]
        self.optimizer = torch.optim.AdamW(self.forward.parameters(), lr=lr)

    def forward_backward(self, batch) -> float:
        # the EP model splits its share of the batch over the EP group itself
        inputs, targets = _slice(batch, self.expert_dp, self.mesh.dp_index // self.mesh.ep)
        loss = self.forward.loss(inputs, targets)
        loss.backward()
        self.forward.allreduce_grads()
        reduce_grads(self.expert_dp, self.replicated)
        reduce_grads(self.expert_dp, self.experts)
        return self.expert_dp.all_reduce(loss.detach().reshape(1).clone(), op="avg")[0].item()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        grads = [p.grad for p in self.replicated + self.experts if p.grad is not None]
        experts_sq = sum((p.grad.double().pow(2).sum() for p in self.experts), torch.zeros((), dtype=torch.float64))
        experts_sq = self.ep.all_reduce(experts_sq.reshape(1))[0]
        replicated_sq = sum((p.grad.double().pow(2).sum() for p in self.replicated),
                            torch.zeros((), dtype=torch.float64))
        return scale_to_max_norm_(grads, (experts_sq + replicated_sq).sqrt(), max_norm)


def seeded_model(kind: str, seed: int, config, dtype: torch.dtype) -> nn.Module:
    """The TinyMoE (ep) or TinyLlama (cp) every rank and the oracle start from."""
    torch.manual_seed(seed)
    return (TinyMoE if kind == "ep" else TinyLlama)(config).to(dtype)


def train_cp_ep(comm, kind: str, *, dp: int, cp: int = 1, ep: int = 1, steps: int, batch_size: int,
                seq_len: int, lr: float, max_norm: float | None, config, dtype: torch.dtype, seed: int = 0,
                attention: str = "ring", capacity_factor: float | None = None) -> list[float]:
    """The `cp` (TinyLlama, dp × cp) or `ep` (TinyMoE, ep dividing dp) run of `gpuforge train`: the losses."""
    mesh = DeviceMesh(comm, dp=dp, cp=cp, ep=ep)
    model = seeded_model(kind, seed, config, dtype)
    trainer = ContextParallelTrainer(model, mesh, attention=attention, lr=lr) if kind == "cp" else \
        ExpertParallelTrainer(model, mesh, capacity_factor=capacity_factor, lr=lr)
    batches = lambda step: make_batch(seed * 100_003 + step, batch_size, seq_len)
    return run_steps(trainer, batches, steps, max_norm=max_norm,
                     before_step=lambda step: setattr(comm.ledger, "step", step))


def single_process_cp_ep_losses(kind: str, *, steps: int, batch_size: int, seq_len: int, lr: float,
                                max_norm: float | None, config, dtype: torch.dtype, seed: int = 0) -> list[float]:
    """The same run in one process (the oracle)."""
    model = seeded_model(kind, seed, config, dtype)
    loss = loss_fn if kind == "ep" else (lambda m, batch: lm_loss(m(batch[0]), batch[1]))
    trainer = DataParallelTrainer("single", DataParallelLoss(model, loss), lr=lr)
    return run_steps(trainer, lambda step: [make_batch(seed * 100_003 + step, batch_size, seq_len)], steps,
                     max_norm=max_norm)


def default_config(kind: str, seq_len: int) -> TinyLlamaConfig:
    """TinyLlama's defaults (cp), TinyMoE's (ep), long enough for seq_len."""
    if kind == "ep":
        return TinyLlamaConfig.small(n_experts=4, moe_top_k=2, max_seq_len=max(seq_len, 256))
    return TinyLlamaConfig(max_seq_len=max(seq_len, 256))
