"""Expert parallelism for the TinyMoE (models/vol2_llm.py): its experts sharded over an EP group, tokens moved
to their experts and back with all-to-alls.

The n ranks of the group each train on their own slice of the batch (the group is also the data-parallel
group of everything but the experts). Rank r holds experts r·E/n .. (r+1)·E/n − 1 of every MoE layer; the
router, attention, norms and embedding are replicated. Per MoE layer and forward:
  1. route: softmax router, top-k experts per token, weights renormalised over the k (as the reference);
     the load-balancing loss α·N·Σ fᵢPᵢ per sequence from this rank's own sequences, as in one process;
  2. dispatch: the (token, expert) assignments sorted by expert; one all-to-all of the per-expert counts
     (n·E/n int64 each way), then one all-to-all of the token rows (unequal splits);
  3. every local expert runs on the rows it received (on none if none came: it stays in the graph);
  4. combine: the all-to-all back, then each token sums its experts' outputs times their router weights.
The backward mirrors the two row all-to-alls.

Capacity: with `capacity_factor=None` (no-drop mode) every assignment is kept, which is what matches one
process exactly. With a factor c, each rank keeps at most ceil(c·T·k/E) assignments per expert from its T
local tokens. The drop policy: earlier tokens first, in the order of the flattened (batch, position) rows
(sequence by sequence, position by position); a token's k choices compete independently. A dropped
assignment contributes nothing: the token keeps the other experts' weighted outputs (the weights are not
renormalised) and the residual stream carries it. `dropped` counts the last forward's dropped assignments.

`ExpertParallelLM.loss(tokens, targets)` takes the global batch, keeps this rank's rows and returns the global
mean loss (cross-entropy plus the load-balancing losses), the same on every rank; after backward,
`allreduce_grads()` sums the replicated parameters' gradients over the group (the experts' gradients
already arrived with the combine's backward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.models.vol2_llm import MoEFeedForward, lm_loss
from gpuforge.parallel.comm import as_group_comm
from gpuforge.parallel.model_parallel.a2a_mappings import all_to_all_rows
from gpuforge.parallel.model_parallel.tp_mappings import reduce_from_tp


def check_ep_config(n_experts: int, ep: int, capacity_factor=None) -> None:
    """Raise ValueError when `n_experts` cannot be split over ep ranks or the capacity factor is bad."""
    if not isinstance(ep, int) or ep < 1:
        raise ValueError(f"ep: expected a positive int, got {ep!r}")
    if n_experts % ep:
        raise ValueError(f"n_experts ({n_experts}) must be divisible by the EP degree ({ep})")
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or not isinstance(
            capacity_factor, (int, float)) or not 0 < capacity_factor < math.inf):
        raise ValueError(f"capacity_factor: expected None (no drops) or a positive number, got {capacity_factor!r}")


def keep_within_capacity(expert_of: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Bool mask over assignments sorted by (expert, token): True for the first `capacity` of each expert."""
    counts = torch.bincount(expert_of, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(expert_of.numel(), device=expert_of.device) - starts[expert_of]
    return rank_in_expert < capacity


class ExpertParallelMoE(nn.Module):
    """A MoEFeedForward whose experts live on the ranks of `comm` (a GroupComm); forward(x (..., S, dim))."""

    def __init__(self, moe: MoEFeedForward, comm, *, capacity_factor: float | None = None):
        super().__init__()
        n_experts = len(moe.experts)
        check_ep_config(n_experts, comm.size, capacity_factor)
        self.comm, self.capacity_factor = comm, capacity_factor
        self.n_experts, self.top_k, self.aux_loss_coef = n_experts, moe.top_k, moe.aux_loss_coef
        per_rank = n_experts // comm.size
        self.first_expert = comm.rank * per_rank
        self.router, self.softmax = moe.router, moe.softmax
        self.experts = nn.ModuleList(moe.experts[self.first_expert:self.first_expert + per_rank])
        self.aux_loss, self.dropped = torch.zeros(()), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = self.softmax(self.router(flat))
        weights, chosen = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        self.aux_loss = self._balance_loss(probs, chosen, x.shape[-2])
        order = torch.argsort(chosen.flatten(), stable=True)  # by expert, then token
        expert_of, token_of, slot_of = chosen.flatten()[order], order // self.top_k, order % self.top_k
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * chosen.numel() / self.n_experts)
            keep = keep_within_capacity(expert_of, self.n_experts, capacity)
            self.dropped = int((~keep).sum())
            expert_of, token_of, slot_of = expert_of[keep], token_of[keep], slot_of[keep]
        returned = self._run_experts(flat[token_of], expert_of)
        out = torch.zeros_like(flat).index_add(0, token_of, weights[token_of, slot_of, None] * returned)
        return out.view_as(x)

    def _run_experts(self, rows: torch.Tensor, expert_of: torch.Tensor) -> torch.Tensor:
        """Rows sorted by expert -> the experts' outputs, in the same order (dispatch, compute, combine)."""
        n, local = self.comm.size, len(self.experts)
        counts = torch.bincount(expert_of, minlength=self.n_experts).view(n, local)
        received_counts = self.comm.all_to_all(counts, 0, 0)  # row i: what rank i sends to my experts
        in_splits, out_splits = counts.sum(1).tolist(), received_counts.sum(1).tolist()
        received = all_to_all_rows(rows, self.comm, in_splits, out_splits)
        local_expert = torch.repeat_interleave(torch.arange(local, device=rows.device).repeat(n),
                                               received_counts.flatten())
        by_expert = torch.argsort(local_expert, stable=True)
        sizes = torch.bincount(local_expert, minlength=local).tolist()
        outputs = torch.cat([expert(chunk) for expert, chunk in
                             zip(self.experts, received[by_expert].split(sizes), strict=True)])
        outputs = outputs[torch.argsort(by_expert)]  # back to the order the rows arrived in
        return all_to_all_rows(outputs, self.comm, out_splits, in_splits)

    def _balance_loss(self, probs, chosen, seq_len: int) -> torch.Tensor:
        """α·N·Σᵢ fᵢPᵢ per sequence, averaged over this rank's sequences (MoEFeedForward's definition)."""
        n = self.n_experts
        assigned = F.one_hot(chosen, n).sum(-2).to(probs.dtype).view(-1, seq_len, n)
        fraction = assigned.mean(-2) / self.top_k
        mean_prob = probs.view(-1, seq_len, n).mean(-2)
        return self.aux_loss_coef * n * (fraction * mean_prob).sum(-1).mean()


class ExpertParallelLM(nn.Module):
    """A TinyMoE with its experts sharded over the EP group; forward(tokens) on this rank's batch rows."""

    def __init__(self, model: nn.Module, comm, *, capacity_factor: float | None = None):
        super().__init__()
        config = model.config
        if not config.n_experts:
            raise ValueError("expert_parallelize: the model has no mixture-of-experts layers (n_experts = 0)")
        check_ep_config(config.n_experts, comm.size, capacity_factor)
        comm.check_same_module("expert_parallelize", model, capacity=-1.0 if capacity_factor is None
                               else float(capacity_factor), **{k: getattr(config, k) for k in (
                                   "vocab_size", "dim", "n_layers", "n_experts", "moe_top_k", "hidden_dim")})
        self.config, self.comm, self.model = config, comm, model
        for block in model.layers:
            block.feed_forward = ExpertParallelMoE(block.feed_forward, comm, capacity_factor=capacity_factor)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)

    def local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch (dim 0)."""
        if t.shape[0] % self.comm.size:
            raise ValueError(f"batch size {t.shape[0]} must be divisible by the EP degree {self.comm.size}")
        return t.chunk(self.comm.size)[self.comm.rank]

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The global batch's mean loss (cross-entropy + load balancing), the same on every rank."""
        x, y = self.local_rows(tokens), self.local_rows(targets)
        local = lm_loss(self.model(x), y) + sum(b.feed_forward.aux_loss for b in self.model.layers)
        return reduce_from_tp((local / self.comm.size).reshape(1), self.comm)[0]

    def replicated_parameters(self) -> list[nn.Parameter]:
        experts = {id(p) for b in self.model.layers for p in b.feed_forward.experts.parameters()}
        return [p for p in self.parameters() if id(p) not in experts]

    def allreduce_grads(self) -> None:
        """Sum the replicated parameters' gradients over the group: one all-reduce of them all."""
        params = [p for p in self.replicated_parameters() if p.grad is not None]
        if self.comm.size == 1 or not params:
            return
        flat = self.comm.all_reduce(torch.cat([p.grad.reshape(-1) for p in params]))
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p).clone()


def expert_parallelize(model: nn.Module, comm, group=None, *,
                       capacity_factor: float | None = None) -> ExpertParallelLM:
    """Shard a TinyMoE's experts over the ranks of `group` (default: all of `comm`); its MoE layers are
    replaced in place. capacity_factor None: no drops (see the module docstring for the drop policy)."""
    return ExpertParallelLM(model, as_group_comm(comm, group), capacity_factor=capacity_factor)
