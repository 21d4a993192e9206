"""Context parallelism for a TinyLlama: its sequence sharded over a context-parallel group.

Every rank gets the full (b, s) tokens and keeps its positions only: the zigzag chunks r and 2n − 1 − r of
2n for ring attention (ring_attention.py, load-balanced under the causal mask), a contiguous 1/n for
Ulysses (ulysses.py). Embedding, norms, feed-forwards and head run on this rank's tokens alone; attention is
the only layer that talks.

- `ContextParallelAttention(attn, comm)` replaces one block's attention (a GQAttention, TP-sharded or not):
  from its input (b, s/n, dim) it rotates q and k by their global positions (from s = n · the local length)
  and attends over the group. `shard_attention(blocks, comm)` swaps it into every block, inside a tensor-
  parallel region where there is one, so the same blocks run in a pipeline stage (4D: dp × tp × pp × cp).
- `context_parallelize(model, comm)` (`ContextParallelLM`): the whole model on this rank's positions. The
  weights are replicated, so each rank's gradients are partial sums over its tokens: `allreduce_grads()` sums
  them over the group after the backward pass. `loss(tokens, targets)` is the mean cross-entropy over the
  whole sequence, the same on every rank (an all-reduce of the local sums forward, identity backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.kernels.rope import rotate_interleaved
from gpuforge.parallel.comm import as_group_comm
from gpuforge.parallel.model_parallel.ring_attention import ring_attention, zigzag_positions
from gpuforge.parallel.model_parallel.tp_mappings import reduce_from_tp
from gpuforge.parallel.model_parallel.ulysses import check_ulysses_heads, ulysses_attention

ATTENTIONS = ("ring", "ulysses")


def check_cp_config(config, cp: int, attention: str = "ring", *, heads_per_rank: int = 1) -> None:
    """Raise ValueError when a TinyLlama cannot run with its sequence over cp ranks (its heads already split
    over `heads_per_rank` tensor-parallel ranks: Ulysses then shares each rank's heads)."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention: expected one of {ATTENTIONS}, got {attention!r}")
    if not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp: expected a positive int, got {cp!r}")
    if config.n_experts:
        raise ValueError("context_parallelize: mixture-of-experts feed-forwards balance their load per sequence, "
                         "which a sharded sequence would change; not supported")
    if attention == "ulysses":
        check_ulysses_heads(config.n_heads // heads_per_rank, config.n_kv_heads // heads_per_rank, cp)


def sequence_positions(seq_len: int, cp: int, rank: int, attention: str) -> torch.Tensor:
    """The global positions this rank holds: zigzag (ring) or a contiguous slice (Ulysses)."""
    if attention == "ring":
        return zigzag_positions(seq_len, cp, rank)
    if seq_len % cp:
        raise ValueError(f"seq_len: {seq_len} must be divisible by the Ulysses degree {cp}")
    part = seq_len // cp
    return torch.arange(rank * part, (rank + 1) * part)


class ContextParallelAttention(nn.Module):
    """One block's attention on this rank's positions: wq/wk/wv (column-parallel under TP: this rank's
    heads), RoPE at the global positions, ring attention or Ulysses over `comm`, then wo."""

    def __init__(self, attn: nn.Module, comm, *, attention: str = "ring"):
        super().__init__()
        self.wq, self.wk, self.wv, self.wo = attn.wq, attn.wk, attn.wv, attn.wo
        self.head_dim, self.rope, self.comm, self.attention = attn.head_dim, attn.rope, comm, attention

    def forward(self, x: torch.Tensor, start_pos: int = 0, cache=None, layer: int = 0) -> torch.Tensor:
        if start_pos or cache is not None:
            raise ValueError("context-parallel attention trains whole sequences: no KV cache, start_pos 0")
        b, length, _ = x.shape
        pos = sequence_positions(length * self.comm.size, self.comm.size, self.comm.rank, self.attention)
        q, k, v = (w(x).view(b, length, -1, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        rope = self.rope[0]
        if pos[-1] >= rope.cos.shape[0]:
            raise ValueError(f"sequence length {length * self.comm.size} exceeds max_seq_len {rope.cos.shape[0]}")
        cos, sin = rope.cos[pos.to(rope.cos.device)], rope.sin[pos.to(rope.cos.device)]
        q, k = rotate_interleaved(q, cos, sin), rotate_interleaved(k, cos, sin)
        parallel = ring_attention if self.attention == "ring" else ulysses_attention
        out = parallel(q, k, v, self.comm, causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, length, -1))


def shard_attention(blocks, comm, *, attention: str = "ring") -> None:
    """Replace every block's attention (or, in a tensor-parallel region, the attention inside it) by its
    context-parallel form over `comm`."""
    for block in blocks:
        holder, name = (block.attention, "inner") if hasattr(block.attention, "inner") else (block, "attention")
        setattr(holder, name, ContextParallelAttention(getattr(holder, name), comm, attention=attention))


class ContextParallelLM(nn.Module):
    """forward(tokens (b, s)) -> this rank's logits (b, s/n, vocab), at `positions(s)`."""

    def __init__(self, model: nn.Module, comm, *, attention: str = "ring"):
        super().__init__()
        check_cp_config(model.config, comm.size, attention)
        comm.check_same_module("context_parallelize", model, attention=attention,
                               **{k: getattr(model.config, k) for k in ("vocab_size", "dim", "n_layers", "n_heads",
                                                                        "n_kv_heads", "hidden_dim")})
        self.config, self.comm, self.attention = model.config, comm, attention
        shard_attention(model.layers, comm, attention=attention)
        self.model = model

    def positions(self, seq_len: int) -> torch.Tensor:
        return sequence_positions(seq_len, self.comm.size, self.comm.rank, self.attention)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        if tokens.shape[1] > m.rope.cos.shape[0]:
            raise ValueError(f"tokens: sequence length {tokens.shape[1]} exceeds max_seq_len {m.rope.cos.shape[0]}")
        h = m.tok_embeddings(tokens[:, self.positions(tokens.shape[1]).to(tokens.device)])
        for i, block in enumerate(m.layers):
            h = block(h, 0, None, i)
        return F.linear(m.norm(h), m.tok_embeddings.weight)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy over the whole (b, s), in at least float32."""
        logits = self.forward(tokens)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        local = targets[:, self.positions(targets.shape[1]).to(targets.device)]
        total = F.cross_entropy(logits.flatten(0, 1), local.flatten(), reduction="sum") / targets.numel()
        return reduce_from_tp(total.reshape(1), self.comm)[0]

    def allreduce_grads(self) -> None:
        """Sum the gradients over the group (each rank saw its own positions): one all-reduce of them all."""
        params = [p for p in self.parameters() if p.grad is not None]
        if self.comm.size == 1 or not params:
            return
        flat = self.comm.all_reduce(torch.cat([p.grad.reshape(-1) for p in params]))
        for p, g in zip(params, flat.split([p.numel() for p in params]), strict=True):
            p.grad = g.view_as(p).clone()


def context_parallelize(model: nn.Module, comm, group=None, *, attention: str = "ring") -> ContextParallelLM:
    """Shard a TinyLlama's sequence over the ranks of `group` (default: all of `comm`) with ring attention
    (zigzag) or Ulysses. Every rank passes the same full model, which is reused (not copied)."""
    return ContextParallelLM(model, as_group_comm(comm, group), attention=attention)
