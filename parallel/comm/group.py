"""`GroupComm`: the communicator seen through one process group, in the shapes model parallelism needs.

Tensor and pipeline parallelism speak in group ranks (TP rank, stage index) and gather or scatter along a
tensor dimension (the sequence), while `Communicator` speaks in global ranks and flat buffers. This view
translates: `rank`/`size` are the group's, peers are group ranks, `all_gather(t, dim)` and
`reduce_scatter(t, dim)` concatenate / split along `dim`, `all_to_all(t, split_dim, concat_dim)` trades
chunks (Ulysses), `all_to_all_rows` moves unequal row counts (expert dispatch), and `ring_exchange` posts
one step of a ring (context parallelism). Every call still goes through the communicator,
so the ledger, timeouts and flight recorder see it (the ledger's `group` is the tuple of global ranks).
"""

from __future__ import annotations

import torch

from gpuforge.parallel.comm.communicator import Communicator, Group, P2POp
from gpuforge.parallel.comm.config_check import check_same_config, tensors_fingerprint


class GroupComm:
    def __init__(self, comm: Communicator, group: Group | None = None):
        self.comm = comm
        self.group = comm.world if group is None else group
        if not self.group.member(comm.rank):
            raise ValueError(f"rank {comm.rank} is not a member of group {list(self.group.ranks)}")
        self.rank, self.size = self.group.rank_of(comm.rank), self.group.size

    @property
    def ledger(self):
        return self.comm.ledger

    def _g(self):
        return None if self.group is self.comm.world else self.group

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place on the contiguous `t`; returns it."""
        if self.size > 1:
            self.comm.all_reduce(t, op=op, group=self._g())
        return t

    def all_gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Concatenation of every rank's `t` along `dim`, in group-rank order."""
        if self.size == 1:
            return t
        front = t.movedim(dim, 0).contiguous()
        out = torch.empty((self.size * front.shape[0], *front.shape[1:]), dtype=t.dtype, device=t.device)
        self.comm.all_gather(out, front, group=self._g())
        return out.movedim(0, dim)

    def reduce_scatter(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum over ranks of `t`, split along `dim` into `size` chunks; this rank keeps chunk `rank`."""
        if self.size == 1:
            return t
        if t.shape[dim] % self.size:
            raise ValueError(f"reduce_scatter: dimension {dim} of size {t.shape[dim]} is not divisible by "
                             f"the group size {self.size}")
        front = t.movedim(dim, 0).contiguous()
        out = torch.empty((front.shape[0] // self.size, *front.shape[1:]), dtype=t.dtype, device=t.device)
        self.comm.reduce_scatter(out, front, group=self._g())
        return out.movedim(0, dim)

    def all_to_all(self, t: torch.Tensor, split_dim: int, concat_dim: int) -> torch.Tensor:
        """Chunk j of `t` along `split_dim` goes to group rank j; the chunks received are concatenated along
        `concat_dim` in group-rank order (equal splits)."""
        if self.size == 1:
            return t
        if t.shape[split_dim] % self.size:
            raise ValueError(f"all_to_all: dimension {split_dim} of size {t.shape[split_dim]} is not divisible "
                             f"by the group size {self.size}")
        inp = torch.stack(t.chunk(self.size, split_dim)).contiguous()
        out = torch.empty_like(inp)
        self.comm.all_to_all(out, inp, group=self._g())
        return torch.cat(out.unbind(0), dim=concat_dim)

    def all_to_all_rows(self, t: torch.Tensor, in_splits, out_splits) -> torch.Tensor:
        """Rows in_splits[j] of `t` (along dim 0, in order) go to group rank j; returns the rows received,
        out_splits[j] of them from rank j, in group-rank order."""
        inp = t.contiguous()
        out = t.new_empty((sum(out_splits), *t.shape[1:]))
        if self.size == 1:
            return out.copy_(inp)
        self.comm.all_to_all(out, inp, list(out_splits), list(in_splits), group=self._g())
        return out

    def ring_exchange(self, tensors, shift: int = 1) -> tuple[list[torch.Tensor], RingWork]:
        """Send each tensor to group rank (rank + shift) and receive same-shaped ones from (rank − shift), all
        posted at once (non-blocking: no ring can deadlock). Returns the receive buffers and the work to
        wait on before reading them."""
        dst, src = self.group.ranks[(self.rank + shift) % self.size], self.group.ranks[(self.rank - shift) % self.size]
        received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]
        ops = [P2POp("irecv", r, src) for r in received] + [P2POp("isend", t.contiguous(), dst) for t in tensors]
        return received, RingWork(self.comm.batch_isend_irecv(ops, group=self._g()))

    def check_same_config(self, owner: str, device, **fields) -> None:
        """config_check.check_same_config over this group (one all-gather): every rank raises on a mismatch."""
        check_same_config(self.comm, self._g(), owner, device, **fields)

    def check_same_module(self, owner: str, module: torch.nn.Module, **fields) -> None:
        """The same, with the shapes and dtypes of every parameter and buffer of `module` in the fields."""
        tensors = list(module.parameters()) + list(module.buffers())
        device = tensors[0].device if tensors else torch.device("cpu")
        self.check_same_config(owner, device, tensors=tensors_fingerprint(tensors), **fields)

    def isend(self, t: torch.Tensor, peer: int):
        """Non-blocking send to group rank `peer`; returns the Work to wait on."""
        return self.comm.send(t, self.group.ranks[peer], group=self._g(), async_op=True)

    def irecv(self, t: torch.Tensor, peer: int):
        """Non-blocking receive into `t` from group rank `peer`; returns the Work to wait on."""
        return self.comm.recv(t, self.group.ranks[peer], group=self._g(), async_op=True)

    def recv(self, t: torch.Tensor, peer: int) -> torch.Tensor:
        """Blocking receive into `t` from group rank `peer`; returns `t`."""
        self.comm.recv(t, self.group.ranks[peer], group=self._g())
        return t


class RingWork:
    """The sends and receives of one ring exchange; `wait()` completes them all."""

    def __init__(self, works):
        self.works = works

    def wait(self) -> None:
        for work in self.works:
            work.wait()


def as_group_comm(comm, group: Group | None = None) -> GroupComm:
    """`comm` itself if it is already a GroupComm (and no group is given), else its view through `group`."""
    if isinstance(comm, GroupComm):
        if group is not None:
            raise ValueError("pass either a GroupComm or a Communicator with a group, not both")
        return comm
    return GroupComm(comm, group)
