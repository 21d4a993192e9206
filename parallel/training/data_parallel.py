"""`DataParallelTrainer`: the strategy factory and the Trainer (loop.py) of every data-parallel strategy, ours and
PyTorch's, over a module whose `forward(*batch)` returns this rank's loss (`gathered_loss.DataParallelLoss`).
Its step is gradient accumulation over micro-batches, global-norm clipping and an optimizer step.

    trainer = DataParallelTrainer("zero2", DataParallelLoss(model, loss_fn, comm), comm, lr=1e-2)
    loss, grad_norm = trainer.step(micro_batches, max_norm=1.0)

Ours: "single" (one process, the reference), "ddp" (DistributedDataParallel, `no_sync()` on all but the last
micro-batch), "zero1" / "zero2" (ZeroRedundancyOptimizer), "zero3" (FullyShardedDataParallel, one unit per
`auto_wrap` module). Theirs (torch.distributed, so comm.kind == "torch"): "torch_ddp", "torch_zero1"
(torch DDP + torch.distributed.optim.ZeroRedundancyOptimizer), "torch_zero2" and "torch_zero3"
(`fully_shard` per `auto_wrap` module and the root, with reshard_after_forward False and True).
Each micro-batch's loss is divided by their number, so the accumulated gradient is that of their mean.
"""

from __future__ import annotations

import contextlib

import torch

from gpuforge.parallel.data_parallel.ddp import DistributedDataParallel
from gpuforge.parallel.data_parallel.fsdp import FullyShardedDataParallel
from gpuforge.parallel.data_parallel.zero import ZeroRedundancyOptimizer
from gpuforge.parallel.training.loop import Trainer

OURS = ("ddp", "zero1", "zero2", "zero3")
ZERO_STAGES = {"zero1": 1, "zero2": 2}
THEIRS = {"ddp": "torch_ddp", "zero1": "torch_zero1", "zero2": "torch_zero2", "zero3": "torch_zero3"}
STRATEGIES = ("single", *OURS, *THEIRS.values())


class DataParallelTrainer(Trainer):
    def __init__(self, strategy: str, module: torch.nn.Module, comm=None, *, lr: float, auto_wrap=(),
                 optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW, **optimizer_options):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if strategy != "single" and comm is None:
            raise ValueError(f"strategy {strategy!r} needs a communicator, got comm=None")
        if strategy.startswith("torch_") and comm.kind != "torch":
            raise ValueError(f"strategy {strategy!r} runs on torch.distributed, got a {comm.kind!r} communicator")
        self.strategy, self.module = strategy, module
        self.forward, params = module, module.parameters()
        if strategy == "ddp":
            self.forward = DistributedDataParallel(module, comm)
        elif strategy in ("torch_ddp", "torch_zero1"):
            self.forward = torch.nn.parallel.DistributedDataParallel(module)
        elif strategy == "zero3":
            self.forward = FullyShardedDataParallel(module, comm, auto_wrap=auto_wrap or None)
            params = self.forward.shard_parameters()
        elif strategy in ("torch_zero2", "torch_zero3"):
            _fully_shard(module, auto_wrap, reshard_after_forward=strategy == "torch_zero3")
        if strategy in ZERO_STAGES:
            self.optimizer = ZeroRedundancyOptimizer(params, optimizer_class, comm, zero_stage=ZERO_STAGES[strategy],
                                                     lr=lr, **optimizer_options)
        elif strategy == "torch_zero1":
            from torch.distributed.optim import ZeroRedundancyOptimizer as TorchZero

            self.optimizer = TorchZero(params, optimizer_class=optimizer_class, lr=lr, **optimizer_options)
        else:
            self.optimizer = optimizer_class(params, lr=lr, **optimizer_options)

    def forward_backward(self, micro_batches) -> float:
        """Accumulate over `micro_batches` (tuples of tensors); each loss is divided by their number, so the
        gradient is that of their mean. Returns this rank's loss."""
        total, last = 0.0, len(micro_batches) - 1
        for i, batch in enumerate(micro_batches):
            skip_sync = i < last and self.strategy in ("ddp", "torch_ddp", "torch_zero1")
            with self.forward.no_sync() if skip_sync else contextlib.nullcontext():
                loss = self.forward(*batch) / len(micro_batches)
            loss.backward()
            total += loss.item()
        return total

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        if self.strategy in ZERO_STAGES:
            norm = self.optimizer.clip_grad_norm_(max_norm)
        elif self.strategy == "zero3":
            norm = self.forward.clip_grad_norm_(max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), max_norm)
        return _full(norm)

    def gather_full_params(self) -> None:
        """Rebuild every whole parameter in `module` (a collective under ZeRO-3: call on every rank)."""
        if self.strategy == "zero3":
            self.forward.gather_full_params()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter and buffer, whole (a collective under the ZeRO-3 strategies: call on every rank)."""
        self.gather_full_params()
        return {name: _full(t).detach().clone() for name, t in self.module.state_dict().items()}


def _fully_shard(module: torch.nn.Module, auto_wrap, *, reshard_after_forward: bool) -> None:
    from torch.distributed.fsdp import fully_shard

    for sub in module.modules():
        if sub is not module and isinstance(sub, tuple(auto_wrap)):
            fully_shard(sub, reshard_after_forward=reshard_after_forward)
    fully_shard(module, reshard_after_forward=reshard_after_forward)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor (torch FSDP's parameters and norms) gathered whole; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
