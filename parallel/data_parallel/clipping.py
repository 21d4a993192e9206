"""Global-norm gradient clipping from shards: the one rule every strategy applies once it has the global norm.

torch.nn.utils.clip_grad_norm_'s rule: with the 2-norm of the whole model's gradient (summed over the shards
and ranks by the caller), every gradient is multiplied by min(1, max_norm / (norm + 1e-6)).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def scale_to_max_norm_(grads, norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale `grads` in place so that a global norm `norm` becomes at most `max_norm`; returns `norm`."""
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(device=g.device, dtype=g.dtype))
    return norm
