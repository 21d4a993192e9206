"""The backward pass split in two for zero-bubble schedules: B (input gradients) now, W (weight gradients) later.

`SplitBackward(module)` hooks every submodule that owns trainable parameters directly (a Linear, an Embedding,
a norm). While `recording()` is open, each such module's forward output is kept beside its parameters
(`Recorded`); `add(params, output)` keeps one more (a parameter the root module uses itself, e.g. a tied head
reading the logits). Then

- `backward_input(roots, root_grads, inputs, recorded)`: one autograd pass from the roots (the stage's output,
  and its MoE load-balancing loss) to the stage's inputs AND to every recorded output; the weight branches of
  the graph are not run (autograd only computes what a requested input needs), so this is the part of the
  backward the previous stage waits for;
- `backward_weight(recorded, grads)`: for each recorded output, the gradient of its own parameters from the
  gradient B left at that output: only the ops between that output and the parameters run again.

The parameter gradients are exact, not approximated: a parameter owned directly by one module reaches the loss
only through that module's output, so dL/dθ = (dL/d output)·(d output/dθ). A parameter that a module reads
through another recorded output (one parameter in two modules) would be counted twice: the stage cuts its graph
at the embedding output for that reason (pipeline_runtime.py). The graph is kept (retain_graph) until W has run.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Recorded:
    params: list[nn.Parameter]
    output: torch.Tensor  # the module's output (where W starts)
    wrt: torch.Tensor  # the tensor whose gradient B computes: the output, or a leaf cut from it


def direct_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters(recurse=False) if p.requires_grad]


class SplitBackward:
    def __init__(self, module: nn.Module):
        self._recording: list[Recorded] | None = None
        self.covered: set[int] = set()
        for sub in module.modules():
            params = direct_parameters(sub)
            if sub is module or not params:
                continue
            self.covered.update(id(p) for p in params)
            sub.register_forward_hook(self._hook(params))

    def _hook(self, params):
        def hook(_module, _args, output):
            if self._recording is not None and isinstance(output, torch.Tensor) and output.requires_grad:
                self._recording.append(Recorded(params, output, output))
        return hook

    @contextlib.contextmanager
    def recording(self):
        """Collect the outputs of the hooked modules run inside the block; yields the list."""
        self._recording = []
        try:
            yield self._recording
        finally:
            self._recording = None

    @staticmethod
    def backward_input(roots: list[torch.Tensor], root_grads: list, inputs: list[torch.Tensor],
                       recorded: list[Recorded]) -> tuple[list, list]:
        """(gradients of `inputs`, gradients of the recorded outputs) of Σ roots · root_grads (None: a scalar
        root's gradient 1); None where a tensor reaches no root."""
        wrt = inputs + [r.wrt for r in recorded]
        grads = torch.autograd.grad(roots, wrt, root_grads, retain_graph=True, allow_unused=True)
        return list(grads[:len(inputs)]), list(grads[len(inputs):])

    @staticmethod
    def backward_weight(recorded: list[Recorded], grads: list) -> None:
        """Accumulate each recorded module's parameter gradients into `.grad` (in place when one exists)."""
        for r, g in zip(recorded, grads, strict=True):
            if g is None:
                continue
            for p, pg in zip(r.params, torch.autograd.grad(r.output, r.params, g, retain_graph=True,
                                                           allow_unused=True), strict=True):
                if pg is None:
                    continue
                if p.grad is None:
                    p.grad = pg
                else:
                    p.grad.add_(pg)
