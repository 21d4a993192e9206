"""Flat buffers of parameters: laid end to end, zero-padded to a multiple of the group size, and viewed back
as one tensor per parameter (ZeRO's shards, FSDP's units, checkpoints, the 3D trainer's norm mask)."""

from __future__ import annotations

import torch


def flatten_padded(params, tensors, padded: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """tensors (one per parameter, shaped like it, None = zeros) laid end to end in a zero-padded flat buffer
    of `dtype` (default: the parameters')."""
    flat = torch.zeros(padded, dtype=dtype or params[0].dtype, device=params[0].device)
    offset = 0
    for p, t in zip(params, tensors, strict=True):
        if t is not None:
            flat[offset:offset + p.numel()].copy_(t.reshape(-1))
        offset += p.numel()
    return flat


@torch.no_grad()
def bind_grad(p: torch.Tensor, view: torch.Tensor) -> None:
    """Make p.grad the `view` into a flat gradient buffer, keeping its value: zero when there is no gradient
    yet, copied in when autograd allocated one elsewhere (the first backward, or after set_to_none)."""
    if p.grad is None:
        view.zero_()
    elif p.grad.data_ptr() != view.data_ptr():
        view.copy_(p.grad)
    p.grad = view


def flat_views(params, flat: torch.Tensor) -> list[torch.Tensor]:
    """Views of `flat`, one shaped like each parameter, in order."""
    views, offset = [], 0
    for p in params:
        views.append(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    return views
