"""Looking through module wrappers that hold no state of their own.

A module with exactly one child, no parameters or buffers of its own and no container as that child (a loss wrapper
such as training's DataParallelLoss around the model) names every parameter with an extra prefix and groups
nothing. FSDP's default units and the checkpoints' parameter names are taken from the innermost module, so a
model trains and checkpoints the same with or without such a wrapper.
"""

from __future__ import annotations

import torch

CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential)


def innermost(module: torch.nn.Module) -> torch.nn.Module:
    while len(module._modules) == 1 and not module._parameters and not module._buffers:
        (child,) = module._modules.values()
        if child is None or isinstance(child, CONTAINERS):
            break
        module = child
    return module
