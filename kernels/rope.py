"""Rotary position embedding (RoPE): the angle tables and the rotation, in one place.

Pair i of a head vector (dims 2i and 2i+1, the "interleaved" layout the reference models and Meta's Llama
use) is rotated by pos · theta^(−2i/D), so relative positions enter q·k only through their difference.
"""

from __future__ import annotations

import torch


def rope_angles(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (max_seq_len, head_dim // 2) float64: the rotation of pair i at position pos."""
    if head_dim % 2:
        raise ValueError(f"head_dim: RoPE needs an even head dim, got {head_dim}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.arange(max_seq_len, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos(), angles.sin()


def rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., S, D) with pairs (x[2i], x[2i+1]) rotated by the angles of cos/sin (S, D/2), in x's dtype."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
