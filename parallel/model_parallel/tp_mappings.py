"""Megatron's conjugate operators for tensor and sequence parallelism, as autograd Functions with an explicit
`comm` (a GroupComm of the tensor-parallel group):

- `copy_to_tp` (f): identity forward, all-reduce of the gradient backward — where a replicated activation
  enters a region whose ranks each hold a slice of the weights;
- `reduce_from_tp` (g): all-reduce forward, identity backward — where the partial sums leave the region;
- `gather_from_sp`: all-gather along a dim forward (sequence shards -> full sequence), reduce-scatter backward;
- `reduce_scatter_to_sp`: reduce-scatter forward (partial sums -> summed sequence shard), all-gather backward.
A column-parallel linear followed by a row-parallel one needs exactly one g forward and one f backward, so an
attention block or an MLP moves 2 all-reduces of b·s·h elements per micro-batch (ring cost 2(t−1)/t each).
"""

from __future__ import annotations

import torch


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
