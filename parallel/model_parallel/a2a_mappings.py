"""All-to-all as autograd Functions with an explicit `comm` (a GroupComm): the backward of an all-to-all is
the all-to-all that undoes it.

- `all_to_all_4d(x, comm, split_dim, concat_dim)`: chunk j along split_dim to rank j, the chunks received
  concatenated along concat_dim (Ulysses: heads <-> sequence);
- `all_to_all_rows(x, comm, in_splits, out_splits)`: unequal row counts along dim 0 (expert dispatch and
  combine); the backward sends the gradient rows back with the splits swapped.
"""

from __future__ import annotations

import torch


class _AllToAll4D(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, split_dim, concat_dim):
        ctx.comm, ctx.dims = comm, (split_dim, concat_dim)
        return comm.all_to_all(x, split_dim, concat_dim)

    @staticmethod
    def backward(ctx, grad):
        split_dim, concat_dim = ctx.dims
        return ctx.comm.all_to_all(grad, concat_dim, split_dim), None, None, None


class _AllToAllRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, in_splits, out_splits):
        ctx.comm, ctx.splits = comm, (in_splits, out_splits)
        return comm.all_to_all_rows(x, in_splits, out_splits)

    @staticmethod
    def backward(ctx, grad):
        in_splits, out_splits = ctx.splits
        return ctx.comm.all_to_all_rows(grad, out_splits, in_splits), None, None, None


def all_to_all_4d(x: torch.Tensor, comm, split_dim: int, concat_dim: int) -> torch.Tensor:
    return _AllToAll4D.apply(x, comm, split_dim, concat_dim)


def all_to_all_rows(x: torch.Tensor, comm, in_splits, out_splits) -> torch.Tensor:
    return _AllToAllRows.apply(x, comm, tuple(in_splits), tuple(out_splits))
