"""The description of one attention call that every attention backend reads besides the tensors.

Query i of a sequence sees key j when i + (Sk − Sq) − window_left <= j <= i + (Sk − Sq) + window_right
(bottom-right alignment: the last query with the last key; −1 for an unbounded side). Dense calls have
q (B, Hq, Sq, D); varlen calls pack sequences as (total, H, D) with int32 offsets cu_q / cu_k and give the
longest lengths as seqlen_q / seqlen_k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Problem:
    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int  # dense length, or the varlen maximum
    seqlen_k: int
    head_dim: int
    scale: float
    window_left: int  # -1: unbounded
    window_right: int
    cu_q: torch.Tensor | None = None  # int32 (batch + 1,) for varlen
    cu_k: torch.Tensor | None = None

    @classmethod
    def dense(cls, q: torch.Tensor, k: torch.Tensor, scale: float, window_left: int, window_right: int) -> Problem:
        return cls(batch=q.shape[0], heads_q=q.shape[1], heads_kv=k.shape[1], seqlen_q=q.shape[2],
                   seqlen_k=k.shape[2], head_dim=q.shape[3], scale=scale, window_left=window_left,
                   window_right=window_right)

    @classmethod
    def varlen(cls, q: torch.Tensor, k: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int,
               max_k: int, scale: float, window_left: int, window_right: int) -> Problem:
        return cls(batch=cu_q.shape[0] - 1, heads_q=q.shape[1], heads_kv=k.shape[1], seqlen_q=max_q,
                   seqlen_k=max_k, head_dim=q.shape[2], scale=scale, window_left=window_left,
                   window_right=window_right, cu_q=cu_q, cu_k=cu_k)

    @property
    def is_varlen(self) -> bool:
        return self.cu_q is not None

    @property
    def group(self) -> int:
        """Query heads per KV head."""
        return self.heads_q // self.heads_kv

    def bounded_window(self) -> tuple[int, int]:
        """Unbounded sides become a bound no sequence reaches, so kernels need no branch for them."""
        far = self.seqlen_q + self.seqlen_k + 1
        return (far if self.window_left < 0 else self.window_left,
                far if self.window_right < 0 else self.window_right)

    def offsets(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cu_q, cu_k), or a one-element placeholder each for dense calls (kernels ignore it)."""
        if self.is_varlen:
            return self.cu_q, self.cu_k
        dummy = torch.zeros(1, dtype=torch.int32, device=like.device)
        return dummy, dummy
