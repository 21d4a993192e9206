"""Activation checkpointing of a model's blocks: keep a block's input, recompute its inside during backward.

    checkpoint_blocks(model)                          # every block, full recomputation
    checkpoint_blocks(model, "selective")             # every block; the matmul outputs are kept
    checkpoint_blocks(model, every=2)                 # blocks 0, 2, 4, ...: the others keep their activations

The blocks are the children of the model's first-level `nn.ModuleList` / `nn.Sequential` containers (the
transformer layers; `blocks=` names other modules). Each chosen block's `forward` is replaced, on the instance,
by one that runs the original under `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`, so
parameter names, hooks around the block (FSDP's gathers, the pipeline's recording) and the arithmetic are
unchanged: the gradients are the same, computed from recomputed activations. "full" saves only the block's
input; "selective" also saves the outputs of the matrix products (the costly part to recompute) and
recomputes the cheap elementwise ops, norms and softmaxes (torch's selective activation checkpointing).
`saved_activation_bytes(model, fn)` measures the activation memory a forward leaves for its backward (the
`activations` of a MemoryLedger; on the CPU there is no allocator to ask, so it tracks each op's outputs).
"""

from __future__ import annotations

import functools
import gc
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

POLICIES = ("full", "selective")
_SAVED_BY_SELECTIVE = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
                       torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}
_CONTAINERS = (nn.ModuleList, nn.Sequential)


def default_blocks(model: nn.Module) -> list[nn.Module]:
    """The children of the model's (or, through parameterless wrappers, its inner model's) containers."""
    while len(model._modules) == 1 and not model._parameters and not isinstance(next(iter(model.children())),
                                                                                  _CONTAINERS):
        model = next(iter(model.children()))
    return [block for child in model.children() if isinstance(child, _CONTAINERS) for block in child.children()]


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_BY_SELECTIVE else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, policy: str):
    context_fn = (functools.partial(create_selective_checkpoint_contexts, _selective_policy)
                  if policy == "selective" else None)
    extra = {"context_fn": context_fn} if context_fn else {}

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)
    run.checkpoint_policy = policy
    return run


def checkpoint_blocks(model: nn.Module, policy: str = "full", *, every: int = 1, blocks=None) -> list[nn.Module]:
    """Checkpoint every `every`-th block of `model` (or of `blocks`) with `policy`; returns the blocks changed."""
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a positive int, got {every!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    chosen = list(default_blocks(model) if blocks is None else blocks)[::every]
    if not chosen:
        raise ValueError(f"model: {type(model).__name__} has no blocks (children of a ModuleList or Sequential); "
                         "pass blocks=")
    for block in chosen:
        if hasattr(block.forward, "checkpoint_policy"):
            raise ValueError(f"blocks: a {type(block).__name__} is already checkpointed")
        block.forward = _checkpointed(block.forward, policy)
    return chosen


class _Outputs(TorchDispatchMode):
    """Weak references to every tensor an op creates while the mode is on."""

    def __init__(self):
        super().__init__()
        self.refs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.refs += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def saved_activation_bytes(model: nn.Module, fn) -> tuple[object, int]:
    """(fn(), bytes of the distinct storages that ops created during fn() and that are still alive after it):
    what the forward leaves for the backward, whoever keeps it (autograd, a checkpoint's saved inputs, the
    tensors selective checkpointing keeps); the model's parameters are not counted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with _Outputs() as mode:
        out = fn()
    gc.collect()
    live = {}
    for ref in mode.refs:
        t = ref()
        if t is not None and t.untyped_storage().data_ptr() not in params:
            live[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return out, sum(live.values())
