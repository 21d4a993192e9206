"""One communicator interface for every parallel strategy, with two real implementations (torch_backend.py,
mpi_backend.py) made by `init_comm` (factory.py):

    comm = init_comm("torch")        # torch.distributed: gloo on CPU, NCCL on GPU; env from torchrun
    comm = init_comm("mpi")          # mpi4py on MPI.COMM_WORLD (mpiexec -n N); GPU tensors staged via host

Interface (every strategy uses only this; ranks are GLOBAL ranks, as in torch.distributed):

    comm.rank, comm.world_size, comm.local_rank, comm.device, comm.kind ("torch" | "mpi")
    comm.all_reduce(t, op="sum", group=None, async_op=False)        # in place; op: sum avg max min product
    comm.reduce_scatter(out, inp, op="sum", group=None, async_op=False)
        # inp: contiguous, n·out.numel() elements; rank i of the group gets reduced chunk i in `out`
    comm.all_gather(out, inp, group=None, async_op=False)           # out: n·inp.numel(), chunk i = rank i's inp
    comm.broadcast(t, src, group=None, async_op=False)              # src: global rank
    comm.send(t, dst, group=None, async_op=False)                   # dst: global rank
    comm.recv(t, src, group=None, async_op=False)                   # src: global rank
    comm.all_to_all(out, inp, out_splits=None, in_splits=None, group=None, async_op=False)
        # along dim 0: rows in_splits[j] of inp go to group rank j, rows out_splits[j] of out come from it;
        # None: equal splits (dim 0 divisible by the group size, out shaped like inp)
    works = comm.batch_isend_irecv([P2POp("isend", t, peer), P2POp("irecv", t2, peer2), ...], group=None)
        # every operation posted before any is waited on, so a ring of exchanges cannot deadlock
    comm.barrier(group=None)
    g = comm.new_group(ranks)      # call on EVERY rank (as torch); g.ranks, g.size, g.rank_of(global_rank),
                                   # comm.group_rank(g) (this rank's index or -1), g.member(comm.rank)
    comm.group_size(group), comm.group_rank(group)
    comm.ledger                    # CommLedger (comm/ledger.py): op, group, bytes, step, seq per call;
                                   # the training loop advances comm.ledger.step
    comm.flight_recorder           # deque of the last N calls (CallRecord: seq, op, shape, state, times)
    comm.destroy()

With async_op=True a call returns a `Work` (`wait()`, `is_completed()`; gloo's send, recv and all_to_all report
completion only once waited on); otherwise it waits and returns None.
Tensors must be contiguous and on one device; a mismatch is a ValueError naming the argument.

Timeout: each call must complete within `comm.timeout` seconds (init_comm(timeout=...), env
GPUFORGE_COMM_TIMEOUT). Waiting polls the backend's non-blocking handle against a deadline (or, for a handle
that cannot be polled, blocks in the backend's own wait with what is left of the deadline); on expiry a
`CommTimeoutError` names the rank, the op, the shape and the sequence number, and carries (and prints to
stderr) this rank's last N calls (the flight recorder). Every rank stuck in the collective raises.

Debug (`debug=True`, env GPUFORGE_COMM_DEBUG=1): before each collective the group all-gathers a small
metadata vector (op, sequence number, dtype, shape, root); if ranks disagree, every rank raises a
`CommDesyncError` listing what each rank called — within that one collective, before any data moves.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from gpuforge.parallel.comm.ledger import CommEntry, CommLedger

REDUCE_OPS = ("sum", "avg", "max", "min", "product")
_OP_CODES = {name: i for i, name in enumerate(
    ("all_reduce", "reduce_scatter", "all_gather", "broadcast", "send", "recv", "barrier", "all_to_all"))}
_DTYPE_CODES = {dt: i for i, dt in enumerate((torch.float64, torch.float32, torch.float16, torch.bfloat16,
                                              torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8,
                                              torch.bool))}
_META_LEN = 12


class CommError(RuntimeError):
    """A collective failed on this rank (the backend's error, with rank, op, shape and sequence number)."""


class CommTimeoutError(CommError):
    """A collective did not complete within the communicator's timeout."""


class CommDesyncError(CommError):
    """Ranks of one group called different collectives (op, shape, dtype, root or sequence number)."""


@dataclass(frozen=True)
class Group:
    """A process group: global ranks in group order, plus the backend's handle (None where not a member)."""

    ranks: tuple[int, ...]
    handle: object = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    def member(self, rank: int) -> bool:
        return rank in self.ranks

    def rank_of(self, global_rank: int) -> int:
        return self.ranks.index(global_rank)


@dataclass(frozen=True)
class P2POp:
    """One point-to-point operation of `batch_isend_irecv`: op "isend" or "irecv", peer a global rank."""

    op: str
    tensor: torch.Tensor
    peer: int


@dataclass
class CallRecord:
    """One entry of the flight recorder."""

    seq: int
    op: str
    group: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: str
    step: int
    state: str = "launched"
    t_start: float = 0.0
    t_end: float | None = None

    def __str__(self) -> str:
        took = f"{self.t_end - self.t_start:.3f}s" if self.t_end is not None else "not completed"
        return (f"#{self.seq} {self.op} shape={list(self.shape)} dtype={self.dtype} group={list(self.group)} "
                f"step={self.step} {self.state} ({took})")


class Work:
    """A launched call. `wait()` polls the backend handle until done or until the deadline passes."""

    def __init__(self, comm: Communicator, record: CallRecord, handle, deadline: float):
        self._comm, self._record, self._handle, self._deadline = comm, record, handle, deadline
        self._done = False

    def is_completed(self) -> bool:
        return self._done or self._handle.test()

    def wait(self) -> None:
        if self._done:
            return
        blocking = getattr(self._handle, "wait_for", None)
        try:
            if blocking is not None:
                if not blocking(self._deadline - time.monotonic()):
                    self._timed_out()
            else:
                pause = 0.0
                while not self._handle.test():
                    if time.monotonic() > self._deadline:
                        self._timed_out()
                    time.sleep(pause)
                    pause = min(1e-3, pause + 2e-5)
            self._handle.finish()
        except CommError:
            raise
        except Exception as exc:  # the backend's own failure (peer died, connection closed, ...)
            self._record.state = "failed"
            raise CommError(f"rank {self._comm.rank}: {self._describe()} failed: {exc}") from exc
        self._record.state, self._record.t_end, self._done = "completed", time.monotonic(), True

    def _timed_out(self):
        self._record.state = "timed out"
        raise self._comm._timeout_error(self._record)

    def _describe(self) -> str:
        r = self._record
        return f"collective #{r.seq} {r.op} (shape {list(r.shape)}, group {list(r.group)})"


class Communicator:
    """Validation, sequence numbers, ledger, flight recorder, timeout and desync checks over a backend.

    Subclasses implement `_start(op, group, tensors, reduce_op, peer, splits) -> handle` (handle: `test()` -> bool,
    `finish()` completes and raises backend errors; a handle that cannot be polled has `wait_for(seconds)` ->
    False on timeout instead, and `Work.wait` blocks in it) and `_make_group(ranks) -> Group`."""

    kind = "abstract"

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, *,
                 timeout: float = 300.0, debug: bool = False, flight_recorder_size: int = 32):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.timeout, self.debug = float(timeout), debug
        self.ledger = CommLedger()
        self.flight_recorder: deque[CallRecord] = deque(maxlen=flight_recorder_size)
        self._seq: dict[tuple[int, ...], int] = {}
        self.world = Group(tuple(range(world_size)))

    # ---------------------------------------------------------------------------------------- public API
    def all_reduce(self, t, op="sum", group=None, async_op=False):
        self._check_reduce_op(op)
        return self._call("all_reduce", group, (t,), async_op, reduce_op=op)

    def reduce_scatter(self, out, inp, op="sum", group=None, async_op=False):
        self._check_reduce_op(op)
        g = self._group(group)
        self._check_sizes("inp", inp, "out", out, g.size)
        return self._call("reduce_scatter", group, (out, inp), async_op, reduce_op=op)

    def all_gather(self, out, inp, group=None, async_op=False):
        g = self._group(group)
        self._check_sizes("out", out, "inp", inp, g.size)
        return self._call("all_gather", group, (out, inp), async_op)

    def broadcast(self, t, src, group=None, async_op=False):
        return self._call("broadcast", group, (t,), async_op, peer=self._peer("src", src, group))

    def send(self, t, dst, group=None, async_op=False):
        return self._call("send", group, (t,), async_op, peer=self._peer("dst", dst, group))

    def recv(self, t, src, group=None, async_op=False):
        return self._call("recv", group, (t,), async_op, peer=self._peer("src", src, group))

    def all_to_all(self, out, inp, out_splits=None, in_splits=None, group=None, async_op=False):
        g = self._group(group)
        splits = (self._splits("out_splits", out_splits, out, g.size),
                  self._splits("in_splits", in_splits, inp, g.size))
        if out.dtype != inp.dtype:
            raise TypeError(f"out and inp must have one dtype, got {out.dtype} and {inp.dtype}")
        if out.shape[1:] != inp.shape[1:]:
            raise ValueError(f"out and inp must agree beyond dim 0, got shapes {list(out.shape)} and "
                             f"{list(inp.shape)}")
        return self._call("all_to_all", group, (out, inp), async_op, splits=splits)

    def batch_isend_irecv(self, ops, group=None) -> list[Work]:
        """Post every P2POp (isend/irecv) of this rank as one launch, then return their Works (wait on each)."""
        ops = list(ops)
        for i, p in enumerate(ops):
            if not isinstance(p, P2POp) or p.op not in ("isend", "irecv"):
                raise TypeError(f"ops[{i}]: expected P2POp('isend' | 'irecv', tensor, peer), got {p!r}")
        calls = [("send" if p.op == "isend" else "recv", p.tensor, self._peer("peer", p.peer, group)) for p in ops]
        records = [self._record(op, group, (t,), peer, None) for op, t, peer in calls]
        handles = self._start_batch(self._group(group), calls)
        return [Work(self, record, handle, record.t_start + self.timeout)
                for (_, record), handle in zip(records, handles, strict=True)]

    def barrier(self, group=None):
        return self._call("barrier", group, (torch.zeros(1, device=self.device),), False)

    def new_group(self, ranks) -> Group:
        ranks = tuple(int(r) for r in ranks)
        if not ranks or len(set(ranks)) != len(ranks) or not all(0 <= r < self.world_size for r in ranks):
            raise ValueError(f"new_group: ranks must be distinct ranks in [0, {self.world_size}), got {ranks}")
        return self._make_group(ranks)

    def group_size(self, group=None) -> int:
        return self._group(group).size

    def group_rank(self, group=None) -> int:
        g = self._group(group)
        return g.rank_of(self.rank) if g.member(self.rank) else -1

    def destroy(self) -> None:
        """Release the backend's resources (subclasses)."""

    # ---------------------------------------------------------------------------------------- machinery
    def _call(self, op, group, tensors, async_op, *, reduce_op=None, peer=None, splits=None):
        g, record = self._record(op, group, tensors, peer, splits)
        handle = self._start(op, g, tensors, reduce_op, peer, splits)
        work = Work(self, record, handle, record.t_start + self.timeout)
        if async_op:
            return work
        work.wait()
        return None

    def _record(self, op, group, tensors, peer, splits) -> tuple[Group, CallRecord]:
        """Check the tensors, number the call, and enter it in the flight recorder and the ledger (and, in debug
        mode, check that the group agrees on it)."""
        g = self._group(group)
        if not g.member(self.rank):
            raise ValueError(f"{op}: rank {self.rank} is not a member of group {list(g.ranks)}")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{op}: tensor argument {i} must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_contiguous():
                raise ValueError(f"{op}: tensor argument {i} must be contiguous (shape {list(t.shape)})")
        main = tensors[1] if op in ("reduce_scatter", "all_to_all") else tensors[0]  # the full-size operand
        key = g.ranks if op not in ("send", "recv") else ("p2p", *sorted((self.rank, peer)))
        seq = self._seq.get(key, 0)
        self._seq[key] = seq + 1
        record = CallRecord(seq, op, g.ranks, tuple(main.shape), str(main.dtype).replace("torch.", ""),
                            self.ledger.step, t_start=time.monotonic())
        self.flight_recorder.append(record)
        if op != "barrier":
            row_bytes = math.prod(main.shape[1:]) * main.element_size()
            kept = splits[1][g.rank_of(self.rank)] * row_bytes if op == "all_to_all" else 0
            self.ledger.record(CommEntry(op, g.ranks, main.numel() * main.element_size(), self.ledger.step,
                                         seq, record.shape, record.dtype, kept))
        if self.debug and op not in ("send", "recv") and g.size > 1:
            self._check_desync(g, record, peer)
        return g, record

    def _check_desync(self, g: Group, record: CallRecord, peer) -> None:
        meta = torch.zeros(_META_LEN, dtype=torch.int64)
        # all_to_all's dim 0 may differ between ranks (unequal splits): compare the rest only
        shape = ([-1, *record.shape[1:]] if record.op == "all_to_all" else list(record.shape))[:_META_LEN - 5]
        meta[:5] = torch.tensor([_OP_CODES[record.op], record.seq, len(record.shape),
                                 -1 if peer is None else peer, _dtype_code(record.dtype)])
        meta[5:5 + len(shape)] = torch.tensor(shape, dtype=torch.int64)
        meta = meta.to(self.device)
        gathered = torch.empty(g.size * _META_LEN, dtype=torch.int64, device=self.device)
        handle = self._start("all_gather", g, (gathered, meta), None, None, None)
        Work(self, record, handle, time.monotonic() + self.timeout).wait()
        rows = gathered.view(g.size, _META_LEN).cpu()
        if not bool((rows == rows[0]).all()):
            names = {v: k for k, v in _OP_CODES.items()}
            lines = [f"  rank {r}: {names.get(int(m[0]), '?')} seq={int(m[1])} shape={m[5:5 + int(m[2])].tolist()} "
                     f"root={int(m[3])} dtype_code={int(m[4])}" for r, m in zip(g.ranks, rows)]
            raise CommDesyncError(f"rank {self.rank}: desync detected at collective #{record.seq} on group "
                                  f"{list(g.ranks)}; ranks called:\n" + "\n".join(lines))

    def _timeout_error(self, record: CallRecord) -> CommTimeoutError:
        dump = "\n".join(f"  {r}" for r in self.flight_recorder)
        msg = (f"rank {self.rank}: collective #{record.seq} {record.op} with shape {list(record.shape)} "
               f"(dtype {record.dtype}, group {list(record.group)}, step {record.step}) did not complete within "
               f"{self.timeout:g}s. Flight recorder (last {len(self.flight_recorder)} calls on rank "
               f"{self.rank}):\n{dump}")
        print(msg, file=sys.stderr, flush=True)
        return CommTimeoutError(msg)

    def _group(self, group) -> Group:
        if group is None:
            return self.world
        if not isinstance(group, Group):
            raise TypeError(f"group must be a Group from comm.new_group(...) or None, got {type(group).__name__}")
        return group

    def _peer(self, name, peer, group) -> int:
        g = self._group(group)
        if not isinstance(peer, int) or not g.member(peer):
            raise ValueError(f"{name} must be a global rank in group {list(g.ranks)}, got {peer!r}")
        return peer

    @staticmethod
    def _splits(name, splits, t, n) -> tuple[int, ...]:
        """Rows per group rank along dim 0 of `t` (equal when `splits` is None)."""
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            raise TypeError(f"all_to_all: {name[:-7]} must be a torch.Tensor with at least one dim, got {t!r}")
        if splits is None:
            if t.shape[0] % n:
                raise ValueError(f"{name}: None means equal splits, but dim 0 of size {t.shape[0]} is not "
                                 f"divisible by the group size {n}")
            return (t.shape[0] // n,) * n
        splits = tuple(splits)
        if len(splits) != n or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in splits):
            raise ValueError(f"{name}: expected {n} non-negative ints (one per group rank), got {list(splits)}")
        if sum(splits) != t.shape[0]:
            raise ValueError(f"{name}: the splits sum to {sum(splits)}, dim 0 has {t.shape[0]} rows")
        return splits

    @staticmethod
    def _check_reduce_op(op) -> None:
        if op not in REDUCE_OPS:
            raise ValueError(f"op must be one of {REDUCE_OPS}, got {op!r}")

    @staticmethod
    def _check_sizes(big_name, big, small_name, small, n) -> None:
        if big.numel() != n * small.numel():
            raise ValueError(f"{big_name} must have group size ({n}) × {small_name}.numel() = "
                             f"{n * small.numel()} elements, got {big.numel()}")
        if big.dtype != small.dtype:
            raise TypeError(f"{big_name} and {small_name} must have one dtype, got {big.dtype} and {small.dtype}")

    def _start(self, op, group, tensors, reduce_op, peer, splits):
        raise NotImplementedError

    def _start_batch(self, group, calls) -> list:
        """Handles of point-to-point calls [(op "send" | "recv", tensor, peer)], launched together. Each call is
        non-blocking here, so starting them one by one cannot deadlock; NCCL overrides this (torch_backend.py)."""
        return [self._start(op, group, (t,), None, peer, None) for op, t, peer in calls]

    def _make_group(self, ranks) -> Group:
        raise NotImplementedError


def _dtype_code(name: str) -> int:
    return _DTYPE_CODES.get(getattr(torch, name, None), 99)
