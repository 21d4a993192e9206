"""Tensor parallelism for the TinyDiT (models/vol3_generative.py): heads split over the TP ranks.

Per DiT block, Megatron's layout with biases:
- self- and cross-attention: `q` and the fused `kv` column-parallel, split per head (the fused kv rows are
  (2, heads, head_dim): each rank keeps its heads of k AND of v, not the first half of the rows), `out`
  row-parallel with its bias added once after the all-reduce. f is applied to the attention input and,
  for cross-attention, also to the text context, whose gradient is then summed over the ranks' heads;
- MLP: column-parallel Linear -> GELU (elementwise, so it runs on the shards) -> row-parallel Linear.
The adaLN modulation, embeddings, norms and final layer stay replicated: they read replicated tensors
(the timestep embedding, the residual stream after each g) and every rank computes the same values and the
same gradients, so no communication is needed for them. Per block: 3 all-reduces of (b, 16, dim) forward
and 3 + 1 (the context's f) backward.
"""

from __future__ import annotations

import torch
from torch import nn

from gpuforge.parallel.comm import GroupComm
from gpuforge.parallel.model_parallel.tp_layers import ColumnParallelLinear, RowParallelLinear
from gpuforge.parallel.model_parallel.tp_mappings import copy_to_tp


def check_dit_tp_config(model: nn.Module, t: int) -> None:
    """Raise ValueError when a TinyDiT cannot be split over t ranks."""
    heads = model.blocks[0].self_attn.heads
    if heads % t:
        raise ValueError(f"heads ({heads}) must be divisible by the TP degree ({t})")
    hidden = model.blocks[0].mlp[0].out_features
    if hidden % t:
        raise ValueError(f"MLP hidden size ({hidden}) must be divisible by the TP degree ({t})")


def shard_fused_heads(full: torch.Tensor, parts: int, comm: GroupComm) -> torch.Tensor:
    """This rank's heads of a fused projection whose rows are `parts` blocks (k, v) of all heads each."""
    return full.reshape(parts, -1, *full.shape[1:]).chunk(comm.size, 1)[comm.rank].reshape(-1, *full.shape[1:])


class ParallelMultiHeadAttention(nn.Module):
    """A MultiHeadAttention with this rank's heads: forward(x, context=None) -> (b, sq, dim), all-reduced."""

    def __init__(self, attn: nn.Module, comm: GroupComm):
        super().__init__()
        self.comm, self.heads = comm, attn.heads // comm.size
        self.q = ColumnParallelLinear.from_linear(attn.q, comm, copy_input=False)
        self.kv = ColumnParallelLinear(shard_fused_heads(attn.kv.weight.detach(), 2, comm).clone(), comm,
                                       bias=shard_fused_heads(attn.kv.bias.detach(), 2, comm).clone(),
                                       copy_input=False)
        self.out = RowParallelLinear.from_linear(attn.out, comm)
        self.attn = attn.attn

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = copy_to_tp(x, self.comm)
        context = x if context is None else copy_to_tp(context, self.comm)
        b, sq, _ = x.shape
        q = self.q(x).view(b, sq, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out(self.attn(q, k, v).transpose(1, 2).reshape(b, sq, -1))


def tensor_parallelize_dit(model: nn.Module, comm: GroupComm) -> nn.Module:
    """Shard a TinyDiT's blocks over `comm` in place; returns the model (same forward, same full output)."""
    check_dit_tp_config(model, comm.size)
    comm.check_same_module("tensor_parallelize", model, blocks=len(model.blocks))
    for block in model.blocks:
        block.self_attn = ParallelMultiHeadAttention(block.self_attn, comm)
        block.cross_attn = ParallelMultiHeadAttention(block.cross_attn, comm)
        up, act, down = block.mlp
        block.mlp = nn.Sequential(ColumnParallelLinear.from_linear(up, comm), act,
                                  RowParallelLinear.from_linear(down, comm))
    return model
