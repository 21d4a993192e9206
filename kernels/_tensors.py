"""Tensor rules every op face shares: the dtype the references compute in, and the (rows, n) view that the
row-wise kernels (softmax, rms_norm) take."""

from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32/float16/bfloat16 inputs, float64 for float64 (the references' and oracles' rule)."""
    return torch.promote_types(dtype, torch.float32)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(…, n) as a (rows, n) matrix whose last dim is contiguous: a view when the layout allows, else a copy."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() else t.reshape(1, 1)
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()
