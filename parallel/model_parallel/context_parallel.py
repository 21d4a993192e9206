"""`context_parallelize(model, comm)`: a TinyLlama with its sequence sharded over a context-parallel group.

Every rank gets the full (b, s) tokens and keeps its positions only: the zigzag chunks r and 2n − 1 − r of
2n for ring attention (ring_attention.py, load-balanced under the causal mask), a contiguous 1/n for
Ulysses (ulysses.py). Embedding, norms, feed-forwards and head run on this rank's tokens alone; RoPE rotates
q and k by their global positions; attention is the only layer that talks. The weights are replicated, so
each rank's gradients are partial sums over its tokens: `allreduce_grads()` sums them over the group after
the backward pass. `loss(tokens, targets)` is the mean cross-entropy over the whole sequence, the same on
every rank (an all-reduce of the local sums forward, identity backward).
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


def check_cp_config(config, cp: int, attention: str = "ring") -> None:
    """Raise ValueError when a TinyLlama cannot run with its sequence over cp ranks."""
    if attention not in ATTENTIONS:
        raise ValueError(f"attention: expected one of {ATTENTIONS}, got {attention!r}")
    if not isinstance(cp, int) or cp < 1:
        raise ValueError(f"cp: expected a positive int, got {cp!r}")
    if config.n_experts:
        raise ValueError("context_parallelize: mixture-of-experts feed-forwards balance their load per sequence, "
                         "which a sharded sequence would change; not supported")
    if attention == "ulysses":
        check_ulysses_heads(config.n_heads, config.n_kv_heads, cp)


def sequence_positions(seq_len: int, cp: int, rank: int, attention: str) -> torch.Tensor:
    """The global positions this rank holds: zigzag (ring) or a contiguous slice (Ulysses)."""
    if attention == "ring":
        return zigzag_positions(seq_len, cp, rank)
    if seq_len % cp:
        raise ValueError(f"seq_len: {seq_len} must be divisible by the Ulysses degree {cp}")
    part = seq_len // cp
    return torch.arange(rank * part, (rank + 1) * part)


class ContextParallelLM(nn.Module):
    """forward(tokens (b, s)) -> this rank's logits (b, s/n, vocab), at `positions(s)`."""

    def __init__(self, model: nn.Module, comm, *, attention: str = "ring"):
        super().__init__()
        check_cp_config(model.config, comm.size, attention)
        comm.check_same_module("context_parallelize", model, attention=attention,
                               **{k: getattr(model.config, k) for k in ("vocab_size", "dim", "n_layers", "n_heads",
                                                                        "n_kv_heads", "hidden_dim")})
        self.config, self.comm, self.attention = model.config, comm, attention
        self.model = model

    def positions(self, seq_len: int) -> torch.Tensor:
        return sequence_positions(seq_len, self.comm.size, self.comm.rank, self.attention)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        if tokens.shape[1] > m.rope.cos.shape[0]:
            raise ValueError(f"tokens: sequence length {tokens.shape[1]} exceeds max_seq_len {m.rope.cos.shape[0]}")
        pos = self.positions(tokens.shape[1]).to(tokens.device)
        h = m.tok_embeddings(tokens[:, pos])
        for block in m.layers:
            h = h + self._attend(block.attention, block.attention_norm(h), pos)
            h = h + block.feed_forward(block.ffn_norm(h))
        return F.linear(m.norm(h), m.tok_embeddings.weight)

    def _attend(self, attn: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q, k, v = (w(x).view(b, length, -1, attn.head_dim).transpose(1, 2) for w in (attn.wq, attn.wk, attn.wv))
        cos, sin = self.model.rope.cos[pos], self.model.rope.sin[pos]
        q, k = rotate_interleaved(q, cos, sin), rotate_interleaved(k, cos, sin)
        parallel = ring_attention if self.attention == "ring" else ulysses_attention
        out = parallel(q, k, v, self.comm, causal=True)
        return attn.wo(out.transpose(1, 2).reshape(b, length, -1))

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
