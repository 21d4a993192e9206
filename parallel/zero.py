"""`ZeroRedundancyOptimizer`: DeepSpeed's ZeRO stages 1 and 2 over a gpuforge communicator.

All trainable parameters (one dtype) are laid end to end in a flat buffer padded to a multiple of the group
size N; rank i owns elements [i·S, (i+1)·S), S = padded/N. The wrapped optimizer (any torch optimizer class)
sees only this rank's shard, held as one flat parameter, so optimizer state is 1/N per rank.

`step()` after the local backward(s) (gradient accumulation is plain accumulation into `.grad`):
- stage 1: all-reduce (average) of the flat gradient — every rank keeps the full averaged gradient;
- stage 2: reduce-scatter (average) — each rank receives only its shard; the full gradients are freed;
then the wrapped optimizer updates the shard and an all-gather of the shards rebuilds every parameter.
Bytes per step on the ledger: stage 1 all_reduce Ψ_pad·B + all_gather Ψ_pad·B; stage 2 reduce_scatter
Ψ_pad·B + all_gather Ψ_pad·B (ring traffic 3(N−1)/N and 2(N−1)/N of Ψ_pad·B).
`clip_grad_norm_(max_norm)` computes the global norm from the shards (one all-reduce of a scalar).
`memory()` reports this rank's bytes of parameters, gradients and optimizer state (ledger.MemoryLedger).
"""

from __future__ import annotations

import torch

from gpuforge.parallel.ledger import MemoryLedger, optimizer_state_bytes, tensor_bytes


def flatten_padded(params, tensors, padded: int) -> torch.Tensor:
    """tensors (one per parameter, shaped like it, None = zeros) laid end to end in a zero-padded flat buffer."""
    flat = torch.zeros(padded, dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p, t in zip(params, tensors, strict=True):
        if t is not None:
            flat[offset:offset + p.numel()].copy_(t.reshape(-1))
        offset += p.numel()
    return flat


class ZeroRedundancyOptimizer:
    def __init__(self, params, optimizer_class: type[torch.optim.Optimizer], comm, *, stage: int = 1,
                 group=None, **defaults):
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2 (stage 3 is FullyShardedDataParallel), got {stage}")
        self.params = [p for p in dict.fromkeys(params) if p.requires_grad]
        if not self.params:
            raise ValueError("params: no parameter requires grad")
        dtypes = {p.dtype for p in self.params}
        if len(dtypes) > 1:
            raise TypeError(f"params: all parameters must have one dtype, got {sorted(map(str, dtypes))}")
        self.comm, self.group, self.stage = comm, group, stage
        self.world, self.rank = comm.group_size(group), comm.group_rank(group)
        self.numel = sum(p.numel() for p in self.params)
        self.shard_size = -(-self.numel // self.world)
        self.padded = self.shard_size * self.world
        src = group.ranks[0] if group is not None else 0
        with torch.no_grad():
            for p in self.params:
                comm.broadcast(p.data, src=src, group=group)
        flat = self._flatten([p.detach() for p in self.params])
        lo = self.rank * self.shard_size
        self.shard = torch.nn.Parameter(flat[lo:lo + self.shard_size].clone())
        self.optimizer = optimizer_class([self.shard], **defaults)
        self._grad_ready = False

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _flatten(self, tensors) -> torch.Tensor:
        return flatten_padded(self.params, tensors, self.padded)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        self.shard.grad, self._grad_ready = None, False

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Average the local gradients across the group into this rank's shard gradient (once per step)."""
        if self._grad_ready:
            return
        flat = self._flatten([p.grad for p in self.params])
        lo = self.rank * self.shard_size
        if self.stage == 1:
            self.comm.all_reduce(flat, op="avg", group=self.group)
            offset = 0
            for p in self.params:
                p.grad = flat[offset:offset + p.numel()].view_as(p)
                offset += p.numel()
            self.shard.grad, self._flat_grad = flat[lo:lo + self.shard_size], flat
        else:
            shard_grad = torch.empty_like(self.shard)
            self.comm.reduce_scatter(shard_grad, flat, op="avg", group=self.group)
            for p in self.params:
                p.grad = None
            self.shard.grad = shard_grad
        self._grad_ready = True

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Scale the gradient so that its global 2-norm is at most max_norm; returns the norm before."""
        self.reduce_gradients()
        sq = self.shard.grad.pow(2).sum().reshape(1)
        self.comm.all_reduce(sq, group=self.group)
        norm = sq.sqrt()[0]
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        # stage 1: the parameters' gradients and the shard's are views of one flat buffer
        (self._flat_grad if self.stage == 1 else self.shard.grad).mul_(coef)
        return norm

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("closure: not supported by ZeroRedundancyOptimizer")
        self.reduce_gradients()
        self.optimizer.step()
        flat = torch.empty(self.padded, dtype=self.shard.dtype, device=self.shard.device)
        self.comm.all_gather(flat, self.shard.detach(), group=self.group)
        offset = 0
        for p in self.params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        self._grad_ready = False

    def memory(self) -> MemoryLedger:
        grads = tensor_bytes(p.grad for p in self.params if p.grad is not None)
        if self.stage == 2 and self.shard.grad is not None:
            grads += tensor_bytes([self.shard.grad])
        return MemoryLedger(params=tensor_bytes(self.params), grads=grads,
                            optimizer_state=optimizer_state_bytes(self.optimizer) + tensor_bytes([self.shard]))

    def state_dict(self) -> dict:
        return {"stage": self.stage, "world": self.world, "rank": self.rank, "numel": self.numel,
                "optimizer": self.optimizer.state_dict()}
