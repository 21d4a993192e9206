"""Mixed precision for the data-parallel strategies: the dtypes (`MixedPrecision`), float32 master weights for
an unsharded optimizer (`MixedPrecisionOptimizer`, what DDP pairs with) and fp16 dynamic loss scaling
(`LossScaler`, in torch.amp.GradScaler's shape).

    mp = MixedPrecision(param_dtype=torch.bfloat16)          # reduce_dtype defaults to param_dtype
    opt = ZeroRedundancyOptimizer(model.to(torch.bfloat16).parameters(), torch.optim.AdamW, comm,
                                  zero_stage=2, mixed_precision=mp, lr=1e-3)
    fsdp = FullyShardedDataParallel(model, comm, mixed_precision=mp)   # float32 shards, bf16 gathered params
    scaler = LossScaler(comm)                                 # fp16: every rank skips the same steps
    scaler.scale(loss).backward(); scaler.unscale_(opt); opt.clip_grad_norm_(1.0); scaler.step(opt); scaler.update()

Parameters and their gradients are in `param_dtype`; gradients are averaged across ranks in `reduce_dtype`
(float32 here makes the reduction exact for bf16 gradients of a few ranks, at twice the bytes); the optimizer
updates float32 master weights and keeps float32 state; the updated master is cast back to `param_dtype`.

LossScaler: `scale(loss)` multiplies by the scale S (a power of two, so scaling and unscaling are exact);
`unscale_(opt)` multiplies the master gradients by 1/S and looks for inf/nan, agreed across the group by
one all-reduce (max) of a float32 flag, so every rank skips the same steps; `step(opt)` skips the update
when one was found; `update()` multiplies S by `backoff_factor` after a skipped step, and by
`growth_factor` after `growth_interval` steps in a row without one.
An optimizer exposes its gradients through `master_grads()` (ZeroRedundancyOptimizer, MixedPrecisionOptimizer);
for a plain torch optimizer (e.g. over FullyShardedDataParallel's float32 shards) they are its params' `.grad`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class MixedPrecision:
    """param_dtype: parameters and gradients; reduce_dtype: the gradient all-reduce / reduce-scatter."""

    param_dtype: torch.dtype = torch.bfloat16
    reduce_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.param_dtype not in LOW_PRECISION:
            raise TypeError(f"param_dtype must be torch.float16 or torch.bfloat16, got {self.param_dtype}")
        if self.reduce_dtype not in (None, *LOW_PRECISION, torch.float32):
            raise TypeError(f"reduce_dtype must be None, float16, bfloat16 or float32, got {self.reduce_dtype}")

    @property
    def reduce(self) -> torch.dtype:
        return self.param_dtype if self.reduce_dtype is None else self.reduce_dtype


def check_mixed_precision(mixed_precision) -> MixedPrecision | None:
    if mixed_precision is not None and not isinstance(mixed_precision, MixedPrecision):
        raise TypeError(f"mixed_precision must be a MixedPrecision or None, got {type(mixed_precision).__name__}")
    return mixed_precision


def clear_grads(params, set_to_none: bool) -> None:
    """optimizer.zero_grad's loop over the model's parameters: drop each `.grad`, or zero it in place."""
    for p in params:
        if set_to_none:
            p.grad = None
        elif p.grad is not None:
            p.grad.zero_()


class MixedPrecisionOptimizer:
    """Any torch optimizer over float32 master copies of low-precision parameters (unsharded: DDP's partner;
    the shape of DeepSpeed's FP16_Optimizer). `step()` casts the gradients up, updates the masters and casts
    them back into the parameters."""

    def __init__(self, params, optimizer_class: type[torch.optim.Optimizer], **defaults):
        self.params = [p for p in dict.fromkeys(params) if p.requires_grad]
        if not self.params:
            raise ValueError("params: no parameter requires grad")
        self.master_params = [torch.nn.Parameter(p.detach().to(torch.float32, copy=True)) for p in self.params]
        self.optimizer = optimizer_class(self.master_params, **defaults)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        clear_grads(self.params, set_to_none)
        for m in self.master_params:
            m.grad = None

    def master_grads(self) -> list[torch.Tensor]:
        """The parameters' gradients cast to float32 as the masters' `.grad` (once per step)."""
        for p, m in zip(self.params, self.master_params, strict=True):
            if m.grad is None:
                m.grad = torch.zeros_like(m) if p.grad is None else p.grad.to(torch.float32)
        return [m.grad for m in self.master_params]

    @torch.no_grad()
    def step(self, closure=None) -> None:
        if closure is not None:
            raise ValueError("closure: not supported by MixedPrecisionOptimizer")
        self.master_grads()
        self.optimizer.step()
        for p, m in zip(self.params, self.master_params, strict=True):
            p.copy_(m)
            m.grad = None


class LossScaler:
    """Dynamic loss scaling for fp16 (torch.amp.GradScaler's API), agreed across `group` of `comm`
    (comm=None: one process)."""

    def __init__(self, comm=None, group=None, *, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("LossScaler: need init_scale > 0, growth_factor > 1, 0 < backoff_factor < 1 and "
                             f"growth_interval >= 1, got {init_scale}, {growth_factor}, {backoff_factor}, "
                             f"{growth_interval}")
        self.comm, self.group = comm, group
        self.scale_value, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.skipped_steps = growth_interval, 0
        self._good_steps, self._found_inf = 0, {}

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale_value

    @staticmethod
    def _grads(optimizer) -> list[torch.Tensor]:
        if hasattr(optimizer, "master_grads"):
            return optimizer.master_grads()
        return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]

    @torch.no_grad()
    def unscale_(self, optimizer) -> bool:
        """Divide the optimizer's gradients by the scale (once per step); True when any rank saw inf/nan."""
        if id(optimizer) in self._found_inf:
            return self._found_inf[id(optimizer)]
        grads = self._grads(optimizer)
        inv = 1.0 / self.scale_value
        finite = True
        for g in grads:
            g.mul_(inv)
            finite = finite and bool(torch.isfinite(g).all())
        flag = torch.tensor([0.0 if finite else 1.0], device=self.comm.device if self.comm is not None else None)
        if self.comm is not None:
            self.comm.all_reduce(flag, op="max", group=self.group)
        self._found_inf[id(optimizer)] = bool(flag.item())
        return self._found_inf[id(optimizer)]

    def step(self, optimizer) -> bool:
        """optimizer.step() unless a rank saw inf/nan; returns whether the step was taken."""
        if self.unscale_(optimizer):
            return False
        optimizer.step()
        return True

    def update(self) -> None:
        if any(self._found_inf.values()):
            self.scale_value *= self.backoff_factor
            self._good_steps = 0
            self.skipped_steps += 1
        elif self._found_inf:
            self._good_steps += 1
            if self._good_steps == self.growth_interval:
                self.scale_value *= self.growth_factor
                self._good_steps = 0
        self._found_inf = {}

    def state_dict(self) -> dict:
        return {"scale": self.scale_value, "good_steps": self._good_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale_value, self._good_steps = float(state["scale"]), int(state["good_steps"])
        self.skipped_steps = int(state["skipped_steps"])
