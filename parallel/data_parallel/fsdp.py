"""`FullyShardedDataParallel`: ZeRO stage 3 — parameters, gradients and optimizer state sharded over N ranks.

    model = FullyShardedDataParallel(model, comm)                 # one unit per block (see _default_units)
    model = FullyShardedDataParallel(model, comm, auto_wrap=(Block,))   # one unit per Block instance
    opt = torch.optim.AdamW(model.shard_parameters(), lr=...)      # any torch optimizer, on the shards
    loss.backward(); model.clip_grad_norm_(1.0); opt.step()

Each unit's trainable parameters (one dtype) become views into one flat buffer padded to a multiple of N;
rank i keeps only elements [i·S, (i+1)·S) as an `nn.Parameter` (the shard). Between uses the flat buffer's
storage is resized to 0, so the original parameters hold no memory. Per unit and step:
- forward pre-hook: all-gather the shards into the flat buffer (the parameters come alive); post-hook: free;
- backward pre-hook (on the unit's outputs): all-gather again; once every parameter of the unit has its
  gradient (post-accumulate-grad hooks), reduce-scatter (average) the flat gradient into the shard's `.grad`,
  drop the full gradients and free the parameters.
Ledger per step: all_gather 2·Ψ_pad·B and reduce_scatter Ψ_pad·B, i.e. ring traffic 3(N−1)/N·Ψ_pad·B
(+ one scalar all-reduce for `clip_grad_norm_`). Parameters of the root that are in no unit form a root unit,
which stays gathered from its forward until its gradients are reduced (as torch FSDP's root), so a loss may
read its parameters after forward.
Frozen parameters are not sharded (kept whole, broadcast from the first rank). A parameter shared between
modules (tied weights) is rejected. Prefetch: when a unit starts (forward or backward), the all-gather of
the unit that followed it in the previous pass is launched asynchronously (same bytes, earlier).
Mixed precision (torch FSDP's `MixedPrecision` shape, mixed_precision.py): the shards stay float32 (they are
the master weights, and the optimizer's state is float32); each all-gather sends the shard cast to
`param_dtype`, so the gathered parameters, the activations and the gradients are low precision; gradients are
reduce-scattered in `reduce_dtype` and accumulated into the float32 shard gradient. Frozen parameters are
cast to `param_dtype`; buffers and inputs are the caller's. Per rank: 4S shard + 4S gradient + 8S Adam
state = 16Ψ/N. fp16 loss scaling: `LossScaler` over the optimizer of the shards.
CPU offload (`offload="cpu"`, torch FSDP's `CPUOffload(offload_params=True)`): the shards, their gradients
and so the optimizer's state live on the host between uses; each all-gather first copies the shard to the
device, each reduce-scatter's result is copied back to the host, and the optimizer steps on the host (the
same arithmetic). `memory()` reports those bytes as `offloaded`; `host_traffic` counts the bytes copied
each way ("to_device", "to_host"). At construction one small all-gather checks every rank has the same
configuration.
"""

from __future__ import annotations

import torch

from gpuforge.parallel.comm.config_check import check_same_config, shapes_fingerprint
from gpuforge.parallel.comm.ledger import MemoryLedger, optimizer_state_bytes, tensor_bytes
from gpuforge.parallel.data_parallel.clipping import scale_to_max_norm_
from gpuforge.parallel.data_parallel.flat import flat_views, flatten_padded
from gpuforge.parallel.data_parallel.mixed_precision import check_mixed_precision
from gpuforge.parallel.data_parallel.wrappers import CONTAINERS, innermost


class _Unit:
    """One wrapped module: its own trainable parameters as views of a flat buffer, and this rank's shard."""

    def __init__(self, module: torch.nn.Module, params: list[torch.nn.Parameter], comm, group, scheduler,
                 mixed_precision, *, is_root: bool, offload: bool = False):
        self.module, self.params, self.comm, self.group, self.scheduler = module, params, comm, group, scheduler
        self.offload = offload
        param_dtype = params[0].dtype if mixed_precision is None else mixed_precision.param_dtype
        self.reduce_dtype = param_dtype if mixed_precision is None else mixed_precision.reduce
        world, rank = comm.group_size(group), comm.group_rank(group)
        self.numel = sum(p.numel() for p in params)
        self.shard_size = -(-self.numel // world)
        self.padded = self.shard_size * world
        with torch.no_grad():
            first = flatten_padded(params, [p.detach() for p in params], self.padded)
            comm.broadcast(first, src=group.ranks[0] if group is not None else 0, group=group)
            lo = rank * self.shard_size
            shard = first[lo:lo + self.shard_size]
            self.shard = torch.nn.Parameter(shard.to("cpu", copy=True) if offload else shard.clone())
            # a storage of our own (`first` may have been exported to MPI), in the parameters' compute dtype
            self.flat = first.to(param_dtype, copy=True)
            for p, view in zip(params, flat_views(params, self.flat), strict=True):
                p.data = view
        self._full_bytes = self.flat.untyped_storage().nbytes()
        self._grads_pending, self._in_flight = len(params), None
        self.free()
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_grad)
        module.register_forward_pre_hook(lambda *_: scheduler.use(self, "forward"))
        if not is_root:  # the root's parameters stay whole after forward: a loss may read them (CLIP's temperature)
            module.register_forward_hook(lambda *_: self.free())
        module.register_full_backward_pre_hook(self._on_backward)

    @property
    def gathered(self) -> bool:
        return self.flat.untyped_storage().nbytes() > 0

    @torch.no_grad()
    def gather(self, async_op: bool = False) -> None:
        """All-gather the full parameters (or finish the one a prefetch launched)."""
        if self._in_flight is None:
            if not self.gathered:
                self.flat.untyped_storage().resize_(self._full_bytes)
            # gather into a temporary under MPI: a buffer exported to MPI (tensor.numpy()) can't be resized later
            full = torch.empty_like(self.flat) if self.comm.kind == "mpi" else self.flat
            if self.offload:  # host -> device, then the all-gather on the device
                shard = self.shard.detach().to(self.flat.device, self.flat.dtype, copy=True)
                self.scheduler.host_traffic["to_device"] += shard.numel() * shard.element_size()
            else:
                shard = self.shard.detach().to(self.flat.dtype)  # the shard itself when no cast is needed
            self._in_flight = (self.comm.all_gather(full, shard, group=self.group, async_op=async_op), full, shard)
            if async_op:
                return
        work, full, _ = self._in_flight
        self._in_flight = None
        if work is not None:
            work.wait()
        if full is not self.flat:
            self.flat.copy_(full)

    def free(self) -> None:
        self.flat.untyped_storage().resize_(0)

    def _on_backward(self, module, grad_output):
        self.scheduler.use(self, "backward")

    @torch.no_grad()
    def _on_grad(self, _param) -> None:
        """Counted per parameter rather than from the backward pre-hook: a parameter used outside the unit's
        forward (a loss reading the root's temperature) may get its gradient before that hook runs."""
        self._grads_pending -= 1
        if self._grads_pending:
            return
        self._grads_pending = len(self.params)
        flat_grad = flatten_padded(self.params, [p.grad for p in self.params], self.padded, self.reduce_dtype)
        shard_grad = torch.empty(self.shard_size, dtype=self.reduce_dtype, device=flat_grad.device)
        self.comm.reduce_scatter(shard_grad, flat_grad, op="avg", group=self.group)
        if self.offload:
            self.scheduler.host_traffic["to_host"] += shard_grad.numel() * shard_grad.element_size()
        shard_grad = shard_grad.to(self.shard.device, self.shard.dtype, copy=self.offload)
        self.shard.grad = shard_grad if self.shard.grad is None else self.shard.grad.add_(shard_grad)
        for p in self.params:
            p.grad = None
        self.free()


def _owned_parameters(root: torch.nn.Module, is_unit) -> dict[torch.nn.Module, list[torch.nn.Parameter]]:
    """Each parameter to the nearest enclosing unit module (the root when none); trainable ones only."""
    owners: dict[torch.nn.Module, list] = {}
    seen: dict[int, str] = {}

    def visit(module, owner, prefix):
        for name, p in module._parameters.items():
            if p is None:
                continue
            if id(p) in seen:
                raise ValueError(f"module: parameter {prefix}{name} is shared with {seen[id(p)]}; tied "
                                 "parameters are not supported by FullyShardedDataParallel")
            seen[id(p)] = prefix + name
            if p.requires_grad:
                owners.setdefault(owner, []).append(p)
        for name, child in module._modules.items():
            if child is not None:
                visit(child, child if is_unit(child) else owner, f"{prefix}{name}.")

    visit(root, root, "")
    return owners


def _default_units(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks of the root's ModuleList / Sequential children (transformer layers); the other children stay in
    the root unit (so a weight tied between the embedding and the head is whole for the root's whole forward).
    Without such containers: each top-level child. A parameterless wrapper is looked through (wrappers.py)."""
    root = innermost(root)
    containers = [c for c in root.children() if isinstance(c, CONTAINERS)]
    return [m for c in containers for m in c.children()] if containers else list(root.children())


class FullyShardedDataParallel(torch.nn.Module):
    def __init__(self, module: torch.nn.Module, comm, *, auto_wrap=None, group=None, mixed_precision=None,
                 offload: str | None = None):
        super().__init__()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if offload not in (None, "cpu"):
            raise ValueError(f"offload must be None or 'cpu', got {offload!r}")
        devices = {p.device for p in module.parameters()}
        if len(devices) > 1:
            raise ValueError(f"module: all parameters must be on one device, got {sorted(map(str, devices))}")
        if auto_wrap is None:
            units = {id(m) for m in _default_units(module)}
            is_unit = lambda m: id(m) in units  # noqa: E731
        else:
            auto_wrap = tuple(auto_wrap)
            if not auto_wrap or not all(isinstance(t, type) and issubclass(t, torch.nn.Module) for t in auto_wrap):
                raise TypeError(f"auto_wrap must be a non-empty list of nn.Module classes, got {auto_wrap!r}")
            is_unit = lambda m: isinstance(m, auto_wrap)  # noqa: E731
        owners = _owned_parameters(module, is_unit)
        if not owners:
            raise ValueError("module: no parameter requires grad")
        for unit_module, params in owners.items():
            dtypes = {p.dtype for p in params}
            if len(dtypes) > 1:
                raise TypeError(f"module: the trainable parameters of one unit ({type(unit_module).__name__}) must "
                                f"have one dtype, got {sorted(map(str, dtypes))}")
        mp = self.mixed_precision = check_mixed_precision(mixed_precision)
        trainable = [p for ps in owners.values() for p in ps]
        if mp is not None and any(p.dtype != torch.float32 for p in trainable):
            raise TypeError("module: with mixed_precision the trainable parameters must be float32 (the shards "
                            "are the float32 master weights)")
        self.module, self.comm, self.group = module, comm, group
        check_same_config(comm, group, "FullyShardedDataParallel", trainable[0].device, world=comm.group_size(group),
                          units=len(owners), numel=sum(p.numel() for p in trainable),
                          shapes=shapes_fingerprint(trainable), dtype=trainable[0].dtype,
                          param_dtype=trainable[0].dtype if mp is None else mp.param_dtype,
                          reduce_dtype=trainable[0].dtype if mp is None else mp.reduce, offload=bool(offload))
        self.offload, self.host_traffic = offload, {"to_device": 0, "to_host": 0}
        with torch.no_grad():
            for p in module.parameters():
                if not p.requires_grad:
                    if mp is not None and p.is_floating_point():
                        p.data = p.data.to(mp.param_dtype)
                    comm.broadcast(p.data, src=group.ranks[0] if group is not None else 0, group=group)
        self.units = [_Unit(m, ps, comm, group, self, mp, is_root=m is module, offload=offload is not None)
                      for m, ps in owners.items()]
        self.shards = torch.nn.ParameterList([u.shard for u in self.units])
        # the order units were used in, per phase: the last complete pass and the one being recorded
        self._order = {"forward": [], "backward": []}
        self._recording = {"forward": [], "backward": []}
        self.prefetches = 0

    def use(self, unit: _Unit, phase: str) -> None:
        """A unit is about to run (forward or backward): make its parameters whole, and launch the all-gather
        of the unit that ran after it in the previous pass of this phase (prefetch, overlapping this unit)."""
        unit.gather()
        self._recording[phase].append(unit)
        order = self._order[phase]
        if unit in order and order.index(unit) + 1 < len(order):
            nxt = order[order.index(unit) + 1]
            if not nxt.gathered and nxt._in_flight is None:
                nxt.gather(async_op=True)
                self.prefetches += 1

    def __getattr__(self, name):
        """Attributes of the wrapped module (e.g. `config`) read through, as DistributedDataParallel does."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def forward(self, *args, **kwargs):
        for phase, seen in self._recording.items():  # a new pass: keep the last one's order for prefetching
            if seen:
                self._order[phase], self._recording[phase] = seen, []
        return self.module(*args, **kwargs)

    def shard_parameters(self) -> list[torch.nn.Parameter]:
        """This rank's flat parameter shards, one per unit: what the optimizer updates."""
        return list(self.shards)

    @torch.no_grad()
    def gather_full_params(self) -> None:
        """All-gather every unit (a collective: call on every rank), e.g. to read or save the full model.
        The next forward frees them again."""
        for unit in self.units:
            unit.gather()

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the shard gradients so that the global 2-norm is at most max_norm; returns the norm before."""
        grads = [s.grad for s in self.shards if s.grad is not None]
        sq = sum((g.pow(2).sum() for g in grads), torch.zeros((), dtype=self.shards[0].dtype,
                                                                 device=self.shards[0].device)).reshape(1)
        sq = sq.to(self.comm.device)  # from the host under offload
        self.comm.all_reduce(sq, group=self.group)
        return scale_to_max_norm_(grads, sq.sqrt()[0].to(self.shards[0].device), max_norm)

    def memory(self, optimizer: torch.optim.Optimizer | None = None) -> MemoryLedger:
        """This rank's bytes now: any gathered units, frozen parameters and the shards (under mixed precision
        the float32 shards are reported as `master`); shard gradients; the optimizer's state when given.
        Under offload the shards, their gradients and the optimizer state are on the host: `offloaded`."""
        gathered = sum(u.flat.untyped_storage().nbytes() for u in self.units)
        frozen = tensor_bytes(p for p in self.module.parameters() if not p.requires_grad)
        shards = tensor_bytes(self.shards)
        grads = tensor_bytes(s.grad for s in self.shards if s.grad is not None)
        state = 0 if optimizer is None else optimizer_state_bytes(optimizer)
        if self.offload:
            return MemoryLedger(params=gathered + frozen, grads=0, optimizer_state=0,
                                offloaded=shards + grads + state)
        master = 0 if self.mixed_precision is None else shards
        return MemoryLedger(params=gathered + frozen + shards - master, master=master, grads=grads,
                            optimizer_state=state)
