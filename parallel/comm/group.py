"""`GroupComm`: the communicator seen through one process group, in the shapes model parallelism needs.

Tensor and pipeline parallelism speak in group ranks (TP rank, stage index) and gather or scatter along a
tensor dimension (the sequence), while `Communicator` speaks in global ranks and flat buffers. This view
translates: `rank`/`size` are the group's, peers are group ranks, `all_gather(t, dim)` and
`reduce_scatter(t, dim)` concatenate / split along `dim`. Every call still goes through the communicator,
so the ledger, timeouts and flight recorder see it (the ledger's `group` is the tuple of global ranks).
"""

from __future__ import annotations

import torch

from gpuforge.parallel.comm.communicator import Communicator, Group
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

    def recv(self, t: torch.Tensor, peer: int) -> torch.Tensor:
        """Blocking receive into `t` from group rank `peer`; returns `t`."""
        self.comm.recv(t, self.group.ranks[peer], group=self._g())
        return t


def as_group_comm(comm, group: Group | None = None) -> GroupComm:
    """`comm` itself if it is already a GroupComm (and no group is given), else its view through `group`."""
    if isinstance(comm, GroupComm):
        if group is not None:
            raise ValueError("pass either a GroupComm or a Communicator with a group, not both")
        return comm
    return GroupComm(comm, group)
