"""Tensor-parallel layers over the TP group (a GroupComm), Megatron's layout.

- `ColumnParallelLinear`: weight (and bias) split by output features;
- `RowParallelLinear`: weight split by input features, the partial products summed by g (or reduce-scattered
  along the sequence under sequence parallelism); its bias is replicated and added once, after the sum;
- `VocabParallelEmbedding`: rows split over the ranks (the vocabulary padded to a multiple of t with zero rows),
  each rank looking up the tokens it owns, g summing the partial embeddings;
- `vocab_parallel_cross_entropy`: the loss from each rank's slice of the logits with three all-reduces of b·s
  numbers (max, sum of exponentials, target logit), never building the (b, s, vocab) logits on one rank;
  padded columns are masked out of the softmax;
- `ParallelRegion`: applies f (or the sequence all-gather) once to the input of a sub-block whose first layers
  are column-parallel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.parallel.model_parallel.tp_mappings import (
    copy_to_tp,
    gather_from_sp,
    reduce_from_tp,
    reduce_scatter_to_sp,
)


def _shard(full: torch.Tensor, comm, dim: int) -> torch.Tensor:
    t = comm.size
    if full.shape[dim] % t:
        raise ValueError(f"dimension {dim} of size {full.shape[dim]} is not divisible by the TP degree {t}")
    return full.chunk(t, dim)[comm.rank].clone()


class ColumnParallelLinear(nn.Module):
    """y_local = x W_localᵀ + b_local with W and b split by output features. `copy_input=False` when the
    caller already applied f (several column layers reading the same input share one backward all-reduce)."""

    def __init__(self, weight: torch.Tensor, comm, *, bias: torch.Tensor | None = None, copy_input: bool = True):
        super().__init__()
        self.comm, self.copy_input = comm, copy_input
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm, **kw) -> ColumnParallelLinear:
        bias = None if linear.bias is None else _shard(linear.bias.detach(), comm, 0)
        return cls(_shard(linear.weight.detach(), comm, 0), comm, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(copy_to_tp(x, self.comm) if self.copy_input else x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_local W_localᵀ + b with W split by input features; the sum is g (an all-reduce), or a
    reduce-scatter along the sequence under sequence parallelism, or skipped with `reduce_output=None`.
    The bias is replicated and added once, after the sum (so it needs the sum: not with reduce_output=None)."""

    def __init__(self, weight: torch.Tensor, comm, *, bias: torch.Tensor | None = None,
                 reduce_output: str | None = "all_reduce"):
        super().__init__()
        if reduce_output not in ("all_reduce", "reduce_scatter", None):
            raise ValueError(f"reduce_output must be 'all_reduce', 'reduce_scatter' or None: {reduce_output}")
        if bias is not None and reduce_output is None:
            raise ValueError("bias: a RowParallelLinear adds its bias after the sum, so it needs reduce_output")
        self.comm, self.reduce_output = comm, reduce_output
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, comm, **kw) -> RowParallelLinear:
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(_shard(linear.weight.detach(), comm, 1), comm, bias=bias, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        if self.reduce_output == "all_reduce":
            y = reduce_from_tp(y, self.comm)
        elif self.reduce_output == "reduce_scatter":
            y = reduce_scatter_to_sp(y, self.comm, 1)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows are split over the TP ranks; the vocabulary is padded to a multiple of t with zero
    rows. Each rank looks up the tokens it owns (zeros elsewhere) and g sums the partial embeddings."""

    def __init__(self, num_embeddings: int, weight: torch.Tensor, comm, *, scatter_sequence: bool = False):
        super().__init__()
        self.comm, self.num_embeddings, self.scatter_sequence = comm, num_embeddings, scatter_sequence
        self.weight = nn.Parameter(weight)
        self.vocab_start = comm.rank * weight.shape[0]

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, comm, **kw) -> VocabParallelEmbedding:
        t = comm.size
        v, d = embedding.weight.shape
        w = embedding.weight.detach()
        padded = torch.zeros((-(-v // t)) * t, d, dtype=w.dtype, device=w.device)
        padded[:v] = w
        return cls(v, padded.chunk(t, 0)[comm.rank].clone(), comm, **kw)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0.0)
        if self.scatter_sequence:
            return reduce_scatter_to_sp(out, self.comm, 1)
        return reduce_from_tp(out, self.comm)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, comm, vocab_start, vocab_size):
        n_local = logits.shape[-1]
        column = vocab_start + torch.arange(n_local, device=logits.device)
        logits = logits.masked_fill(column >= vocab_size, float("-inf"))  # padding rows are not words
        row_max = comm.all_reduce(logits.max(-1).values.contiguous(), op="max")
        shifted = logits - row_max[..., None]
        exp = shifted.exp()
        sum_exp = comm.all_reduce(exp.sum(-1).contiguous())
        local = targets - vocab_start
        mine = (local >= 0) & (local < n_local)
        picked = shifted.gather(-1, local.clamp(0, n_local - 1)[..., None]).squeeze(-1)
        target_logit = comm.all_reduce(picked.masked_fill(~mine, 0.0).contiguous())
        ctx.save_for_backward(exp / sum_exp[..., None], local, mine)
        return sum_exp.log() - target_logit

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine = ctx.saved_tensors
        grad_logits = softmax.clone()
        onehot = F.one_hot(local.clamp(0, softmax.shape[-1] - 1), softmax.shape[-1]).to(softmax.dtype)
        grad_logits -= onehot * mine[..., None]
        return grad_logits * grad[..., None], None, None, None, None


def vocab_parallel_cross_entropy(local_logits: torch.Tensor, targets: torch.Tensor, comm, vocab_size: int):
    """Per-token cross-entropy (same shape as `targets`) from this rank's slice of the logits, the columns
    vocab_start .. vocab_start + local − 1, vocab_start = rank · local; columns ≥ vocab_size are padding."""
    if local_logits.shape[:-1] != targets.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal logits shape without the last dim "
                         f"{tuple(local_logits.shape[:-1])}")
    start = comm.rank * local_logits.shape[-1]
    return _VocabParallelCrossEntropy.apply(local_logits, targets, comm, start, vocab_size)


class ParallelRegion(nn.Module):
    """Wrap a sub-block whose first layers are column-parallel: apply f once to its input (or, under sequence
    parallelism, all-gather the sequence shards), then run it."""

    def __init__(self, inner: nn.Module, comm, *, sequence_parallel: bool = False):
        super().__init__()
        self.inner, self.comm, self.sequence_parallel = inner, comm, sequence_parallel

    def forward(self, x, *args, **kwargs):
        x = gather_from_sp(x, self.comm, 1) if self.sequence_parallel else copy_to_tp(x, self.comm)
        return self.inner(x, *args, **kwargs)
