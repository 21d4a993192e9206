"""`TorchComm`: the communicator on torch.distributed (gloo for CPU tensors, NCCL for CUDA tensors).

Every call is launched with async_op=True and its `Work` polled with `is_completed()` against our deadline
(see communicator.py), so gloo and NCCL get the same timeout and flight-recorder behaviour. The process
group's own timeout is ours plus PG_TIMEOUT_SLACK_S, so ours fires first with the better message and the
teardown after a timeout waits at most that long. gloo has no AVG reduction:
avg is a sum divided by the group size when the work completes. gloo's reduce_scatter_tensor only runs
inside `wait()` (its `is_completed()` stays False, so it cannot be polled against a deadline): on CPU tensors
reduce_scatter is an all-reduce of a copy of the input, then the rank's chunk is copied out. The ledger
records the logical op (reduce_scatter of the input's bytes) either way. gloo's send/recv and all_to_all works are
also not pollable: they are waited on with gloo's own timeout (`_BlockingHandle`).
"""

from __future__ import annotations

import datetime
import os
import time

import torch
import torch.distributed as dist

from gpuforge.parallel.comm.communicator import Communicator, Group

PG_TIMEOUT_SLACK_S = 5.0
_TORCH_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX,
              "min": dist.ReduceOp.MIN, "product": dist.ReduceOp.PRODUCT}


class _Handle:
    def __init__(self, work, on_done=None):
        self.work, self.on_done = work, on_done

    def test(self) -> bool:
        return self.work.is_completed()

    def finish(self) -> None:
        self.work.wait()
        if self.on_done is not None:
            self.on_done()


class _BlockingHandle(_Handle):
    """For works whose `is_completed()` stays False until `wait()` (gloo's send, recv and all_to_all): waited
    on in gloo's own `wait(timeout)` with what is left of our deadline. (A daemon thread per call, polled,
    cost each send or receive a thread start and up to a scheduler slice, ~1-10 ms on a busy CPU.)"""

    def wait_for(self, seconds: float) -> bool:
        """True once complete; False if our deadline passed first (gloo raised at or after it)."""
        deadline = time.monotonic() + seconds
        try:
            self.work.wait(datetime.timedelta(seconds=max(seconds, 1e-3)))
        except RuntimeError:
            if time.monotonic() >= deadline - 1e-3:
                return False
            raise  # the backend's own failure (peer died, connection closed): reported by Work.wait
        return True

    def finish(self) -> None:
        if self.on_done is not None:
            self.on_done()


class _BatchHandle:
    """The works of one coalesced launch: complete when all of them are."""

    def __init__(self, works):
        self.works = works

    def test(self) -> bool:
        return all(w.is_completed() for w in self.works)

    def finish(self) -> None:
        for w in self.works:
            w.wait()


class TorchComm(Communicator):
    kind = "torch"

    @classmethod
    def from_env(cls, *, backend: str | None = None, **opts) -> TorchComm:
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing and not dist.is_initialized():
            raise RuntimeError(f"init_comm('torch'): environment variables {missing} are not set; launch with "
                               "torchrun (or set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            # a little longer than ours, so ours fires first with the better message; not much longer, because
            # tearing the group down after a timeout waits for the stuck collective until this one expires
            pg_timeout = datetime.timedelta(seconds=opts.get("timeout", 300.0) + PG_TIMEOUT_SLACK_S)
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=pg_timeout,
                                    device_id=device if device.type == "cuda" else None)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, device, **opts)

    def _make_group(self, ranks) -> Group:
        handle = dist.new_group(list(ranks))
        return Group(ranks, handle if self.rank in ranks else None)

    def _start(self, op, group: Group, tensors, reduce_op, peer, splits):
        pg = group.handle  # None: the default (world) group
        if op == "all_reduce":
            (t,) = tensors
            work = dist.all_reduce(t, op=_TORCH_OPS[reduce_op], group=pg, async_op=True)
            return _Handle(work, (lambda: t.div_(group.size)) if reduce_op == "avg" else None)
        if op == "reduce_scatter":
            out, inp = tensors
            if out.is_cuda:
                work = dist.reduce_scatter_tensor(out, inp, op=_TORCH_OPS[reduce_op], group=pg, async_op=True)
                return _Handle(work, (lambda: out.div_(group.size)) if reduce_op == "avg" else None)
            full = inp.clone()  # gloo: see the module docstring
            work = dist.all_reduce(full, op=_TORCH_OPS[reduce_op], group=pg, async_op=True)
            chunk = full.view(group.size, -1)[group.rank_of(self.rank)].view_as(out)
            return _Handle(work, lambda: out.copy_(chunk.div_(group.size) if reduce_op == "avg" else chunk))
        if op == "all_gather":
            out, inp = tensors
            return _Handle(dist.all_gather_into_tensor(out, inp, group=pg, async_op=True))
        if op == "all_to_all":
            out, inp = tensors
            work = dist.all_to_all_single(out, inp, list(splits[0]), list(splits[1]), group=pg, async_op=True)
            return _Handle(work) if out.is_cuda else _BlockingHandle(work)
        if op == "broadcast":
            return _Handle(dist.broadcast(tensors[0], src=peer, group=pg, async_op=True))
        if op == "send":
            work = dist.isend(tensors[0], dst=peer, group=pg)
            return _Handle(work) if tensors[0].is_cuda else _BlockingHandle(work)
        if op == "recv":
            work = dist.irecv(tensors[0], src=peer, group=pg)
            return _Handle(work) if tensors[0].is_cuda else _BlockingHandle(work)
        if op == "barrier":  # an all-reduce of one element: a barrier we can poll against our deadline
            return _Handle(dist.all_reduce(tensors[0], group=pg, async_op=True))
        raise ValueError(f"unknown op {op!r}")

    def _start_batch(self, group: Group, calls) -> list:
        """On CUDA tensors one dist.batch_isend_irecv: NCCL runs a pair's sends and receives in order on one
        stream, so a ring of two ranks posting recv-then-send separately would wait on each other."""
        if not any(t.is_cuda for _, t, _ in calls):
            return super()._start_batch(group, calls)
        ops = [dist.P2POp(dist.isend if op == "send" else dist.irecv, t, peer, group=group.handle)
               for op, t, peer in calls]
        batch = _BatchHandle(dist.batch_isend_irecv(ops))  # NCCL coalesces: possibly one work for them all
        return [batch] * len(calls)

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
