"""`DistributedDataParallel` over a gpuforge communicator (torch.nn.parallel.DistributedDataParallel's shape).

- Parameters that require grad (tied ones once, frozen ones never) are packed, in REVERSE registration order
  (roughly the order backward produces them), into flat buckets: the first holds at most
  `first_bucket_cap_mb` (so communication starts early), the rest `bucket_cap_mb`. One dtype per bucket.
- Each `param.grad` is a view into its bucket (no second copy of the gradients). A post-accumulate-grad hook
  copies a freshly allocated gradient into its slot when autograd did not accumulate into the view.
- When every parameter of a bucket is ready, the hook launches that bucket's averaging all-reduce
  asynchronously — in bucket order, so all ranks issue the same sequence — overlapping the rest of backward.
  A callback at the end of backward launches what is left and waits for all of them.
- After the first synchronised backward the buckets are rebuilt in the observed ready order (rank 0's order,
  broadcast), so later steps launch as early as possible.
- `no_sync()` skips communication for the backward of a forward run inside it (gradient accumulation);
  `find_unused_parameters=True` reduces zeros for parameters without a gradient and keeps `grad=None` on
  parameters unused on every rank (a used-bitmap all-reduce); without it, a parameter that got
  no gradient is an error naming it.
- `join()` handles uneven inputs: a rank out of data shadows the others' all-reduces with zero gradients
  (averages stay divided by the initial world size, as torch's default) and, at the end, everybody takes the
  parameters of the last rank to join.
- `memory(optimizer)`: this rank's bytes (ledger.MemoryLedger): the module's parameters, the gradient
  buckets, and the optimizer's master weights and state (mixed precision: MixedPrecisionOptimizer).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gpuforge.parallel.comm.config_check import check_same_config, fingerprint, shapes_fingerprint, tensors_fingerprint
from gpuforge.parallel.comm.ledger import MemoryLedger, optimizer_memory, tensor_bytes
from gpuforge.parallel.data_parallel.flat import bind_grad

_MB = 1024 * 1024


class _Bucket:
    def __init__(self, params: list[nn.Parameter], device):
        self.params = params
        self.offsets, n = [], 0
        for p in params:
            self.offsets.append(n)
            n += p.numel()
        self.buffer = torch.zeros(n, dtype=params[0].dtype, device=device)
        self.pending = len(params)

    def view(self, i: int) -> torch.Tensor:
        p = self.params[i]
        return self.buffer[self.offsets[i]:self.offsets[i] + p.numel()].view_as(p)


class DistributedDataParallel(nn.Module):
    def __init__(self, module: nn.Module, comm, *, group=None, bucket_cap_mb: float = 25.0,
                 first_bucket_cap_mb: float = 1.0, find_unused_parameters: bool = False,
                 broadcast_buffers: bool = True):
        super().__init__()
        devices = {p.device for p in module.parameters()}
        if len(devices) > 1:
            raise ValueError(f"module: all parameters must be on one device, found {sorted(map(str, devices))}")
        self.module, self.comm, self.group = module, comm, group
        self.device = devices.pop() if devices else torch.device("cpu")
        self.find_unused_parameters, self.broadcast_buffers = find_unused_parameters, broadcast_buffers
        self.caps = (int(first_bucket_cap_mb * _MB), int(bucket_cap_mb * _MB))
        self.world = comm.group_size(group)
        named = {}
        for name, p in module.named_parameters():  # tied parameters are listed once
            if p.requires_grad:
                named.setdefault(id(p), (name, p))
        self.param_names = {id(p): name for name, p in named.values()}
        self.params = [p for _, p in named.values()]
        self._check_same_config()
        with torch.no_grad():
            src = self._root()
            for t in list(module.parameters()) + list(module.buffers()):
                comm.broadcast(t.data, src=src, group=group)
        self.require_sync, self._sync_backward, self.launched_in_hooks = True, True, 0
        self._rebuilt, self._ready_order = False, []
        self._build_buckets(list(reversed(self.params)))
        for p in self.params:
            p.register_post_accumulate_grad_hook(self._on_grad_ready)
        self._reset_step()
        self._join_active, self._iterations = False, 0

    def _root(self) -> int:
        return self.group.ranks[0] if self.group is not None else 0

    # ------------------------------------------------------------------------------------------ buckets
    def _build_buckets(self, order: list[nn.Parameter]) -> None:
        groups, current, size = [], [], 0
        for p in order:
            cap = self.caps[0] if not groups else self.caps[1]
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > cap or p.dtype != current[0].dtype):
                groups.append(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            groups.append(current)
        old = {id(p): p.grad for p in self.params if p.grad is not None}
        self.buckets = [_Bucket(ps, self.device) for ps in groups]
        self._slot = {}
        for b, bucket in enumerate(self.buckets):
            for i, p in enumerate(bucket.params):
                self._slot[id(p)] = (b, i)
                if id(p) in old:
                    bucket.view(i).copy_(old[id(p)])
                p.grad = bucket.view(i)

    def _reset_step(self) -> None:
        self._ready = set()
        self._next_bucket, self._works = 0, []
        self._callback_queued = False
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)

    # ------------------------------------------------------------------------------------------- hooks
    def _ensure_view(self, p) -> None:
        b, i = self._slot[id(p)]
        bind_grad(p, self.buckets[b].view(i))

    def _on_grad_ready(self, p) -> None:
        self._ensure_view(p)
        if not self._sync_backward:
            return
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
        self._mark_ready(p)
        self.launched_in_hooks += self._launch_ready_buckets()

    def _mark_ready(self, p) -> None:
        if id(p) in self._ready:
            return
        self._ready.add(id(p))
        self._ready_order.append(p)
        self.buckets[self._slot[id(p)][0]].pending -= 1

    def _launch_ready_buckets(self) -> int:
        launched = 0
        while self._next_bucket < len(self.buckets) and self.buckets[self._next_bucket].pending == 0:
            bucket = self.buckets[self._next_bucket]
            self._works.append(self.comm.all_reduce(bucket.buffer, op="avg", group=self.group, async_op=True))
            self._next_bucket += 1
            launched += 1
        return launched

    def _finish_backward(self) -> None:
        missing = [p for p in self.params if id(p) not in self._ready]
        if missing and not self.find_unused_parameters:
            names = [self.param_names[id(p)] for p in missing]
            raise RuntimeError(f"DistributedDataParallel: parameters {names} received no gradient; pass "
                               "find_unused_parameters=True if that is expected")
        used = torch.tensor([float(id(p) in self._ready) for p in self.params])
        for p in missing:
            self._ensure_view(p)
            self._mark_ready(p)
        self._launch_ready_buckets()
        if self.find_unused_parameters:
            self.comm.all_reduce(used, op="max", group=self.group)
        for work in self._works:
            work.wait()
        if self.find_unused_parameters:
            for p, u in zip(self.params, used.tolist(), strict=True):
                if u == 0:
                    p.grad = None
        if not self._rebuilt:
            self._rebuild_in_ready_order()
        self._ready_order = []
        self._reset_step()

    def _rebuild_in_ready_order(self) -> None:
        index = {id(p): i for i, p in enumerate(self.params)}
        order = torch.tensor([index[id(p)] for p in self._ready_order], dtype=torch.int64, device=self.device)
        src = self._root()
        self.comm.broadcast(order, src=src, group=self.group)
        unused = {id(p) for p in self.params if p.grad is None}
        self._build_buckets([self.params[i] for i in order.tolist()])
        for p in self.params:
            if id(p) in unused:
                p.grad = None
        self._rebuilt = True

    # ------------------------------------------------------------------------------------------- API
    def __getattr__(self, name):
        """Attributes of the wrapped module (e.g. `config`) read through, so loss functions taking the
        model work on the wrapper too."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def forward(self, *args, **kwargs):
        if self._join_active and self.require_sync:
            self.comm.all_reduce(torch.ones(1, device=self.device), group=self.group)  # "I still have data"
        self._iterations += 1
        self._sync_backward = self.require_sync  # as torch: no_sync() applies to the forward it wraps
        if self.broadcast_buffers and self._rebuilt:
            src = self._root()
            for buf in self.module.buffers():
                self.comm.broadcast(buf.data, src=src, group=self.group)
        return self.module(*args, **kwargs)

    @contextlib.contextmanager
    def no_sync(self):
        previous, self.require_sync = self.require_sync, False
        try:
            yield
        finally:
            self.require_sync = previous

    @contextlib.contextmanager
    def join(self):
        """Wrap the training loop; ranks may run different numbers of iterations inside it."""
        self._join_active, self._iterations = True, 0
        try:
            yield
        finally:
            self._shadow_until_all_joined()
            self._join_active = False

    def _shadow_until_all_joined(self) -> None:
        while True:
            active = torch.zeros(1, device=self.device)
            self.comm.all_reduce(active, group=self.group)
            if active.item() == 0:
                break
            for bucket in self.buckets:  # match the active ranks' gradient all-reduces with zeros
                bucket.buffer.zero_()
                self.comm.all_reduce(bucket.buffer, op="avg", group=self.group)
            if self.find_unused_parameters:
                self.comm.all_reduce(torch.zeros(len(self.params)), op="max", group=self.group)
        me = self.comm.group_rank(self.group)
        last = torch.tensor([self._iterations * self.world + me], dtype=torch.int64, device=self.device)
        self.comm.all_reduce(last, op="max", group=self.group)
        src_index = int(last.item()) % self.world
        src = self.group.ranks[src_index] if self.group is not None else src_index
        with torch.no_grad():
            for t in list(self.module.parameters()) + list(self.module.buffers()):
                self.comm.broadcast(t.data, src=src, group=self.group)

    def memory(self, optimizer=None) -> MemoryLedger:
        """Parameters (every one, tied ones once), the gradient buckets, and the optimizer's master weights and
        state when given."""
        master, state = optimizer_memory(optimizer)
        return MemoryLedger(params=tensor_bytes(self.module.parameters()), master=master, optimizer_state=state,
                            grads=tensor_bytes(b.buffer for b in self.buckets))

    def _check_same_config(self) -> None:
        """Parameters (count, sizes, shapes, dtypes), buffers (shapes, dtypes), bucket caps and flags, equal on
        every rank, or every rank raises (a dtype or buffer mismatch would otherwise abort one rank in gloo)."""
        check_same_config(self.comm, self.group, "DistributedDataParallel", self.device, params=len(self.params),
                          numel=sum(p.numel() for p in self.params), shapes=shapes_fingerprint(self.params),
                          dtypes=fingerprint(p.dtype for p in self.params),
                          buffers=tensors_fingerprint(self.module.buffers()), bucket_caps=fingerprint(self.caps),
                          find_unused_parameters=self.find_unused_parameters,
                          broadcast_buffers=self.broadcast_buffers)
