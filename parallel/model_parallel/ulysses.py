"""Ulysses sequence parallelism (Jacobs et al. 2023): attention over a sequence sharded on the group's ranks
by trading heads for sequence.

Each of the n ranks holds a contiguous 1/n of the sequence with every head. An all-to-all turns q, k and v
into the whole sequence for 1/n of the heads (rank j gets query heads j·Hq/n .. and the KV heads they read),
attention runs locally (gf.flash_attention_with_lse), and one more all-to-all turns the output back into
this rank's positions with every head. Per attention call: 4 all-to-alls forward (q, k, v, out) and 4
backward, each moving (n − 1)/n of its tensor. The degree must divide the KV heads (and so the query heads).
"""

from __future__ import annotations

import torch

from gpuforge.kernels.flash_attention import flash_attention_with_lse
from gpuforge.parallel.model_parallel.a2a_mappings import all_to_all_4d


def check_ulysses_heads(n_heads: int, n_kv_heads: int, degree: int) -> None:
    """Raise ValueError unless the Ulysses degree divides the KV heads (and so the query heads)."""
    if n_kv_heads % degree or n_heads % degree:
        raise ValueError(f"n_kv_heads ({n_kv_heads}) must be divisible by the Ulysses degree ({degree}): each "
                         f"rank attends with whole KV heads (n_heads {n_heads})")


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, comm, *, causal: bool = False,
                      scale: float | None = None) -> torch.Tensor:
    """q (B, Hq, L, D), k/v (B, Hkv, L, D): this rank's contiguous L = S/n positions; returns its output rows.
    `comm`: a GroupComm of the sequence-parallel group."""
    check_ulysses_heads(q.shape[1], k.shape[1], comm.size)
    q, k, v = (all_to_all_4d(t, comm, 1, 2) for t in (q, k, v))
    out, _ = flash_attention_with_lse(q, k, v, causal=causal, scale=scale)
    return all_to_all_4d(out, comm, 2, 1)
