"""`MPIComm`: the communicator on mpi4py (launch with `mpiexec -n N`).

CPU tensors go to MPI through the buffer protocol (`tensor.numpy()` shares memory). Every call uses MPI's
non-blocking form (Iallreduce, Ireduce_scatter_block, Iallgather, Ialltoallv, Ibcast, Isend/Irecv,
Ibarrier) and the
request is polled with `Test()` against our deadline (see communicator.py). Staging, undone when the call finishes:
CUDA tensors are copied through the host (we do not assume a CUDA-aware MPI); float16/bfloat16 reductions
run in float32 (MPI has no half types); bfloat16 data movement goes as raw 16-bit words.
"""

from __future__ import annotations

import math
import os

import torch
from mpi4py import MPI

from gpuforge.parallel.comm.communicator import Communicator, Group

_MPI_OPS = {"sum": MPI.SUM, "avg": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN, "product": MPI.PROD}


class _Handle:
    def __init__(self, request, keep, on_done):
        self.request, self.keep, self.on_done = request, keep, on_done

    def test(self) -> bool:
        return self.request.Test()

    def finish(self) -> None:
        self.request.Wait()
        for fn in self.on_done:
            fn()


def _host(t: torch.Tensor, reduce: bool):
    """(host tensor MPI can read and write, how to copy the result back into t)."""
    h = t
    if h.is_cuda:
        h = h.cpu()
    if reduce and h.dtype in (torch.float16, torch.bfloat16):
        h = h.float()
    if h is t:
        return t, None
    return h, (lambda: t.copy_(h))


def _buf(t: torch.Tensor):
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).reshape(-1).numpy()


class MPIComm(Communicator):
    kind = "mpi"

    def __init__(self, **opts):
        world = MPI.COMM_WORLD
        rank, size = world.Get_rank(), world.Get_size()
        local_rank = int(os.environ.get("MPI_LOCALRANKID", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", rank)))
        device = torch.device("cuda", local_rank % torch.cuda.device_count()) if torch.cuda.is_available() \
            else torch.device("cpu")
        super().__init__(rank, size, local_rank, device, **opts)
        self.world = Group(self.world.ranks, world)

    def _make_group(self, ranks) -> Group:
        world = MPI.COMM_WORLD
        if self.rank not in ranks:
            return Group(ranks, None)
        sub = world.Create_group(world.Get_group().Incl(list(ranks)), tag=hash(ranks) % 32768)
        return Group(ranks, sub)

    def _start(self, op, group: Group, tensors, reduce_op, peer, splits):
        c = group.handle
        reduce = reduce_op is not None
        staged = [_host(t, reduce) for t in tensors]
        bufs = [_buf(h) for h, _ in staged]
        back = [fn for _, fn in staged if fn is not None]
        if op == "all_reduce":
            req = c.Iallreduce(MPI.IN_PLACE, bufs[0], op=_MPI_OPS[reduce_op])
        elif op == "reduce_scatter":
            req = c.Ireduce_scatter_block(bufs[1], bufs[0], op=_MPI_OPS[reduce_op])
            back = back[:1] if staged[0][1] is not None else []
        elif op == "all_gather":
            req = c.Iallgather(bufs[1], bufs[0])
            back = back[:1] if staged[0][1] is not None else []
        elif op == "all_to_all":
            row = math.prod(tensors[1].shape[1:])
            counts = [[n * row for n in side] for side in splits]
            displs = [[sum(side[:j]) for j in range(len(side))] for side in counts]
            req = c.Ialltoallv((bufs[1], (counts[1], displs[1])), (bufs[0], (counts[0], displs[0])))
            back = back[:1] if staged[0][1] is not None else []
        elif op == "broadcast":
            req = c.Ibcast(bufs[0], root=group.rank_of(peer))
        elif op == "send":
            req, back = c.Isend(bufs[0], dest=group.rank_of(peer), tag=7), []
        elif op == "recv":
            req = c.Irecv(bufs[0], source=group.rank_of(peer), tag=7)
        elif op == "barrier":
            req = c.Ibarrier()
        else:
            raise ValueError(f"unknown op {op!r}")
        if reduce_op == "avg":
            target = tensors[0]
            back.append(lambda: target.div_(group.size))
        return _Handle(req, (staged, bufs), back)

    def destroy(self) -> None:
        """MPI is finalised by mpi4py at exit."""
