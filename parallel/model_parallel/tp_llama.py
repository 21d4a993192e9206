"""The TinyLlama's tensor-parallel sharding table (models/vol2_llm.py): heads and KV heads split over the TP
ranks, wq/wk/wv and w1/w3 by columns, wo/w2 by rows, embedding and tied head by vocabulary.

Per layer and micro-batch: 2 all-reduces of b·s·h forward (attention, MLP) and 2 backward, each ring-costing
2(t−1)/t; under sequence parallelism the same volume as reduce-scatters and all-gathers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.parallel.comm import GroupComm
from gpuforge.parallel.model_parallel.tp_layers import (
    ColumnParallelLinear,
    ParallelRegion,
    RowParallelLinear,
    VocabParallelEmbedding,
    vocab_parallel_cross_entropy,
)
from gpuforge.parallel.model_parallel.tp_mappings import copy_to_tp, gather_from_sp


def check_tp_config(config, t: int) -> None:
    """Raise ValueError when a TinyLlama configuration cannot be split over t ranks."""
    for name in ("n_heads", "n_kv_heads", "hidden_dim"):
        if getattr(config, name) % t:
            raise ValueError(f"{name} ({getattr(config, name)}) must be divisible by the TP degree ({t})")


def _column(linear: nn.Linear, comm: GroupComm) -> ColumnParallelLinear:
    """A column layer inside a ParallelRegion (which applies f once for all the layers reading its input)."""
    return ColumnParallelLinear.from_linear(linear, comm, copy_input=False)


class TensorParallelLM(nn.Module):
    """A TinyLlama with its weights sharded over the TP group. forward(tokens) -> this rank's logits
    (b, s, padded_vocab / t); `loss(tokens, targets)` the mean cross-entropy, identical on every rank."""

    def __init__(self, model: nn.Module, comm: GroupComm, *, sequence_parallel: bool = False):
        super().__init__()
        config = model.config
        check_tp_config(config, comm.size)
        # the full model on every rank, same sizes and dtypes (a vocab or hidden-size mismatch would otherwise
        # train silently or abort one rank inside a collective)
        comm.check_same_module("tensor_parallelize", model, sequence_parallel=sequence_parallel,
                               **{k: getattr(config, k) for k in ("vocab_size", "dim", "n_layers", "n_heads",
                                                                  "n_kv_heads", "hidden_dim")})
        self.config, self.comm, self.sequence_parallel = config, comm, sequence_parallel
        reduce = "reduce_scatter" if sequence_parallel else "all_reduce"
        self.tok_embeddings = VocabParallelEmbedding.from_embedding(
            model.tok_embeddings, comm, scatter_sequence=sequence_parallel)
        for block in model.layers:
            if hasattr(block.feed_forward, "experts"):
                raise ValueError("tensor_parallelize: mixture-of-experts feed-forwards are not supported")
            attn, ffn = block.attention, block.feed_forward
            for name in ("wq", "wk", "wv"):
                setattr(attn, name, _column(getattr(attn, name), comm))
            attn.wo = RowParallelLinear.from_linear(attn.wo, comm, reduce_output=reduce)
            for name in ("w1", "w3"):
                setattr(ffn, name, _column(getattr(ffn, name), comm))
            ffn.w2 = RowParallelLinear.from_linear(ffn.w2, comm, reduce_output=reduce)
            block.attention = ParallelRegion(attn, comm, sequence_parallel=sequence_parallel)
            block.feed_forward = ParallelRegion(ffn, comm, sequence_parallel=sequence_parallel)
        self.layers, self.norm, self.rope = model.layers, model.norm, model.rope

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel and tokens.shape[1] % self.comm.size:
            raise ValueError(f"sequence length {tokens.shape[1]} must be divisible by the TP degree "
                             f"{self.comm.size} under sequence parallelism")
        h = self.tok_embeddings(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, 0, None, i)
        return self.head(self.norm(h), self.tok_embeddings.weight)

    def head(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The tied output head: this rank's vocabulary rows only (f, or the sequence all-gather, first)."""
        h = gather_from_sp(h, self.comm, 1) if self.sequence_parallel else copy_to_tp(h, self.comm)
        return F.linear(h, weight)

    def output_loss(self, local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy from this rank's logits (identical on every TP rank)."""
        return vocab_parallel_cross_entropy(local_logits, targets, self.comm, self.config.vocab_size).mean()

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.output_loss(self.forward(tokens), targets)
