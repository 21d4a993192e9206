"""`ZeroRedundancyOptimizer`: DeepSpeed's ZeRO stages 1 and 2 over a gpuforge communicator.

All trainable parameters (one dtype, one device) are laid end to end in a flat buffer padded to a multiple of
the group size N; rank i owns elements [i·S, (i+1)·S), S = padded/N. The wrapped optimizer (any torch
optimizer class) sees only this rank's shard, held as one flat parameter (`shard`, the master weights), so
optimizer state is 1/N per rank.

`step()` after the local backward(s) (gradient accumulation is plain accumulation into `.grad`):
1. reduce-scatter (average) of the flat gradient: each rank receives the averaged gradient of its shard only
   (as DeepSpeed's stage 1 does). Stage 1 keeps one persistent full gradient buffer, the parameters' `.grad`
   being views into it, and writes the averaged shard into its own range of it (so after the reduction the
   `.grad` hold this rank's local gradients elsewhere); stage 2 frees the full gradients right after the
   reduction and holds only the shard's. `master_grads()` is the averaged gradient of the shard.
2. the wrapped optimizer updates the shard; 3. an all-gather of the shards rebuilds every parameter.
Ledger per step, both stages: reduce_scatter Ψ_pad·B_reduce + all_gather Ψ_pad·B_param, i.e. ring traffic
2(N−1)/N·Ψ_pad·B when both are the parameter dtype — DDP's all-reduce volume.

Mixed precision (`mixed_precision=MixedPrecision(param_dtype=torch.bfloat16)`, parameters already in that
dtype): the shard is a float32 master and the optimizer state float32; gradients are reduced in
`reduce_dtype` and cast to float32 for the update; the updated master is cast to `param_dtype` before the
all-gather. fp16 loss scaling: `LossScaler` (mixed_precision.py) through `master_grads()`.
`offload="cpu"`: the master shard and the optimizer state live on the host; the reduced gradient shard is
copied over and the updated shard copied back before the all-gather (the same arithmetic).
`clip_grad_norm_(max_norm)` computes the global norm from the shards (one all-reduce of a scalar).
`memory()` reports this rank's bytes (ledger.MemoryLedger). At construction one small all-gather checks that
every rank has the same configuration (stage, parameter count and shapes, dtypes, offload, world size).
"""

from __future__ import annotations

import torch

from gpuforge.parallel.comm.config_check import check_same_config, hyperparameters_fingerprint, shapes_fingerprint
from gpuforge.parallel.comm.ledger import MemoryLedger, optimizer_state_bytes, tensor_bytes
from gpuforge.parallel.data_parallel.clipping import scale_to_max_norm_
from gpuforge.parallel.data_parallel.flat import bind_grad, flat_views, flatten_padded
from gpuforge.parallel.data_parallel.mixed_precision import check_mixed_precision, clear_grads


def _distinct_bytes(tensors) -> int:
    """Bytes of the tensors, a tensor whose memory lies inside an earlier one's (a view) counted once."""
    spans, total = [], 0
    for t in tensors:
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in spans):
            spans.append((start, end))
            total += end - start
    return total


class ZeroRedundancyOptimizer:
    def __init__(self, params, optimizer_class: type[torch.optim.Optimizer], comm, *, zero_stage: int = 1,
                 group=None, mixed_precision=None, offload: str | None = None, **defaults):
        if zero_stage not in (1, 2):
            raise ValueError(f"zero_stage: expected 1 or 2 (stage 3 is FullyShardedDataParallel), got {zero_stage!r}")
        if offload not in (None, "cpu"):
            raise ValueError(f"offload must be None or 'cpu', got {offload!r}")
        self.params = [p for p in dict.fromkeys(params) if p.requires_grad]
        if not self.params:
            raise ValueError("params: no parameter requires grad")
        dtypes, devices = {p.dtype for p in self.params}, {p.device for p in self.params}
        if len(dtypes) > 1:
            raise TypeError(f"params: all parameters must have one dtype, got {sorted(map(str, dtypes))}")
        if len(devices) > 1:
            raise ValueError(f"params: all parameters must be on one device, got {sorted(map(str, devices))}")
        mp = check_mixed_precision(mixed_precision)
        self.param_dtype, self.device = dtypes.pop(), devices.pop()
        if mp is not None and self.param_dtype != mp.param_dtype:
            raise TypeError(f"params: mixed_precision.param_dtype is {mp.param_dtype} but the parameters are "
                            f"{self.param_dtype}; convert the model first (model.to({mp.param_dtype}))")
        self.reduce_dtype = self.param_dtype if mp is None else mp.reduce
        self.master_dtype = self.param_dtype if mp is None else torch.float32
        self.comm, self.group, self.zero_stage, self.offload = comm, group, zero_stage, offload
        self.world, self.rank = comm.group_size(group), comm.group_rank(group)
        self.numel = sum(p.numel() for p in self.params)
        self.shard_size = -(-self.numel // self.world)
        self.padded = self.shard_size * self.world
        check_same_config(comm, group, "ZeroRedundancyOptimizer", self.device, zero_stage=zero_stage, world=self.world,
                          numel=self.numel, shapes=shapes_fingerprint(self.params), param_dtype=self.param_dtype,
                          reduce_dtype=self.reduce_dtype, master_dtype=self.master_dtype, offload=bool(offload),
                          hyperparameters=hyperparameters_fingerprint(optimizer_class, defaults))
        src = group.ranks[0] if group is not None else 0
        with torch.no_grad():
            for p in self.params:
                comm.broadcast(p.data, src=src, group=group)
        flat = self._flatten([p.detach() for p in self.params])
        lo = self.rank * self.shard_size
        self.shard = torch.nn.Parameter(flat[lo:lo + self.shard_size].to(
            device="cpu" if offload else self.device, dtype=self.master_dtype, copy=True))
        self.optimizer = optimizer_class([self.shard], **defaults)
        self._grad_buffer = torch.zeros(self.padded, dtype=self.param_dtype, device=self.device) \
            if zero_stage == 1 else None
        self._grad_views = flat_views(self.params, self._grad_buffer) if zero_stage == 1 else []
        self._shard_grad, self._grad_ready = None, False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _flatten(self, tensors, dtype=None) -> torch.Tensor:
        return flatten_padded(self.params, tensors, self.padded, dtype)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients. Stage 1 keeps its gradient buffer (zeroed; the `.grad` are views into it)."""
        clear_grads(self.params, set_to_none)
        if self._grad_buffer is not None:
            self._grad_buffer.zero_()
            for p, view in zip(self.params, self._grad_views, strict=True):
                p.grad = view
        self.shard.grad, self._shard_grad, self._grad_ready = None, None, False

    def _stage1_buffer(self) -> torch.Tensor:
        """The gradient buffer, with any gradient autograd allocated outside it (first step) copied in."""
        for p, view in zip(self.params, self._grad_views, strict=True):
            bind_grad(p, view)
        return self._grad_buffer

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the local gradients across the group into this rank's shard gradient (once per step)."""
        if self._grad_ready:
            return
        if self.zero_stage == 1:
            flat = self._stage1_buffer().to(self.reduce_dtype)
        else:
            flat = self._flatten([p.grad for p in self.params], self.reduce_dtype)
            for p in self.params:
                p.grad = None
        shard_grad = torch.empty(self.shard_size, dtype=self.reduce_dtype, device=self.device)
        self.comm.reduce_scatter(shard_grad, flat, op="avg", group=self.group)
        if self.zero_stage == 1 and self.reduce_dtype == self.param_dtype:  # kept in the buffer: no second copy
            lo = self.rank * self.shard_size
            shard_grad = self._grad_buffer[lo:lo + self.shard_size].copy_(shard_grad)
        self._shard_grad, self._grad_ready = shard_grad, True

    @torch.no_grad()
    def master_grads(self) -> list[torch.Tensor]:
        """The averaged gradient of this rank's shard as the master's `.grad` (master dtype and device)."""
        self.reduce_gradients()
        if self.shard.grad is None:  # the same tensor when neither a cast nor a move is needed
            self.shard.grad = self._shard_grad.to(device=self.shard.device, dtype=self.master_dtype)
        return [self.shard.grad]

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradient so that its global 2-norm is at most max_norm; returns the norm before."""
        grad = self.master_grads()[0]
        sq = grad.pow(2).sum().reshape(1).to(self.device)
        self.comm.all_reduce(sq, group=self.group)
        return scale_to_max_norm_([grad], sq.sqrt()[0], max_norm)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("closure: not supported by ZeroRedundancyOptimizer")
        self.master_grads()
        self.optimizer.step()
        shard = self.shard.detach().to(device=self.device, dtype=self.param_dtype)
        flat = torch.empty(self.padded, dtype=self.param_dtype, device=self.device)
        self.comm.all_gather(flat, shard, group=self.group)
        for p, view in zip(self.params, flat_views(self.params, flat), strict=True):
            p.copy_(view)
        self.shard.grad, self._shard_grad, self._grad_ready = None, None, False

    def memory(self) -> MemoryLedger:
        """This rank's bytes now: the model's parameters; gradients held (stage 1: the full buffer, plus any
        gradient autograd allocated outside it; stage 2: full gradients until reduced, then the reduced shard;
        the master's own gradient while step() runs); the master shard and the optimizer state (with
        offload="cpu": `offloaded`, host bytes)."""
        held = [t for t in (self._grad_buffer, self._shard_grad, *(p.grad for p in self.params)) if t is not None]
        grads = _distinct_bytes(held)
        master_grad = _distinct_bytes(held + [self.shard.grad]) - grads if self.shard.grad is not None else 0
        master, state = tensor_bytes([self.shard]), optimizer_state_bytes(self.optimizer)
        if self.offload:
            return MemoryLedger(params=tensor_bytes(self.params), grads=grads, optimizer_state=0,
                                offloaded=master + state + master_grad)
        return MemoryLedger(params=tensor_bytes(self.params), grads=grads + master_grad, optimizer_state=state,
                            master=master)

    def state_dict(self) -> dict:
        return {"zero_stage": self.zero_stage, "world": self.world, "rank": self.rank, "numel": self.numel,
                "optimizer": self.optimizer.state_dict()}
