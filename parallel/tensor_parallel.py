"""Megatron-style tensor parallelism over one communicator (its group is the tensor-parallel group).

The two conjugate operators (Megatron's f and g), as autograd Functions with an explicit `comm`:
- `copy_to_tp` (f): identity forward, all-reduce of the gradient backward — where a replicated activation
  enters a region whose ranks each hold a slice of the weights;
- `reduce_from_tp` (g): all-reduce forward, identity backward — where the partial sums leave the region.
A column-parallel linear (weight split by output features) followed by a row-parallel one (split by input
features) needs exactly one g forward and one f backward, so an attention block or an MLP moves
2 all-reduces of b·s·h elements per micro-batch, and a transformer layer 4 (ring cost 2(t−1)/t each).

The vocabulary is split the same way: `VocabParallelEmbedding` looks up the rows it owns and all-reduces;
the tied LM head multiplies by the local rows only, and `vocab_parallel_cross_entropy` computes the loss from
those local logits with three all-reduces of b·s numbers (max, sum of exponentials, target logit), never
building the (b, s, vocab) logits on one rank. A vocabulary not divisible by t is padded; padded columns are
masked out of the softmax. `tensor_parallelize(model, comm)` shards a TinyLlama (heads and KV heads split)
or a TinyDiT (`tensor_parallel_dit`). Biases: column-parallel ones are split with the weight's rows,
row-parallel ones are replicated and added once, after the reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.parallel.group_comm import GroupComm, as_group_comm

# ----------------------------------------------------------------------------------------------- f and g


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad.contiguous().clone()), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        return comm.all_reduce(x.contiguous().clone())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromSP(torch.autograd.Function):
    """All-gather along `dim` forward (sequence shards -> full sequence), reduce-scatter backward."""

    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return comm.all_gather(x.contiguous(), dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.reduce_scatter(grad.contiguous(), ctx.dim), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    """Reduce-scatter along `dim` forward (partial sums -> summed sequence shard), all-gather backward."""

    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return comm.reduce_scatter(x.contiguous(), dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad.contiguous(), ctx.dim), None, None


def copy_to_tp(x: torch.Tensor, comm) -> torch.Tensor:
    return _CopyToTP.apply(x, comm)


def reduce_from_tp(x: torch.Tensor, comm) -> torch.Tensor:
    return _ReduceFromTP.apply(x, comm)


def gather_from_sp(x: torch.Tensor, comm, dim: int = 1) -> torch.Tensor:
    return _GatherFromSP.apply(x, comm, dim)


def reduce_scatter_to_sp(x: torch.Tensor, comm, dim: int = 1) -> torch.Tensor:
    return _ReduceScatterToSP.apply(x, comm, dim)


# ----------------------------------------------------------------------------------------------- layers


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


# ----------------------------------------------------------------------------------------------- TinyLlama


class ParallelRegion(nn.Module):
    """Wrap a sub-block whose first layers are column-parallel: apply f once to its input (or, under sequence
    parallelism, all-gather the sequence shards), then run it."""

    def __init__(self, inner: nn.Module, comm, *, sequence_parallel: bool = False):
        super().__init__()
        self.inner, self.comm, self.sequence_parallel = inner, comm, sequence_parallel

    def forward(self, x, *args, **kwargs):
        x = gather_from_sp(x, self.comm, 1) if self.sequence_parallel else copy_to_tp(x, self.comm)
        return self.inner(x, *args, **kwargs)


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


def tensor_parallelize(model: nn.Module, comm, group=None, *, sequence_parallel: bool = False) -> nn.Module:
    """Shard a TinyLlama over the ranks of `group` (default: all of `comm`), Megatron's layout: wq/wk/wv and
    w1/w3 by columns, wo/w2 by rows, embedding and tied head by vocabulary (a TensorParallelLM); a TinyDiT
    by `tensor_parallel_dit`. Every rank must pass the same full model; its layers are converted in place and
    reused. `comm`: a Communicator or a GroupComm."""
    from gpuforge.models.vol3_generative import TinyDiT

    if isinstance(model, TinyDiT):
        from gpuforge.parallel.tensor_parallel_dit import tensor_parallelize_dit

        if sequence_parallel:
            raise ValueError("sequence_parallel: not supported for the TinyDiT (its 16 tokens stay whole)")
        return tensor_parallelize_dit(model, as_group_comm(comm, group))
    return TensorParallelLM(model, as_group_comm(comm, group), sequence_parallel=sequence_parallel)
