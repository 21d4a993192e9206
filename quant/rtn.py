"""Round-to-nearest (RTN) group quantization, and the per-group scale/zero rules GPTQ and AWQ reuse.

Symmetric: scale = max|w| / 7, zero = 8, so w / scale lies in [−7, 7] and nothing clips.
Asymmetric: scale = (max − min) / 15, zero = round(−min / scale), so codes span the group's range.
Either way each element's error is at most scale / 2. The scale is rounded to its storage dtype (fp16/bf16)
*upwards* when rounding would shrink it, so that bound still holds with the stored scale.
"""

from __future__ import annotations

import torch

from gpuforge.kernels.int4_format import SCALE_DTYPES, SYMMETRIC_ZERO, Int4Weight, pack_int4, resolve_group_size


def _round_up_to(scale: torch.Tensor, needed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """scale cast to `dtype`, bumped one ulp where the cast fell below `needed` (both float32)."""
    stored = scale.to(dtype)
    low = stored.float() < needed
    if low.any():
        stored = torch.where(low, torch.nextafter(stored, torch.full_like(stored, float("inf"))), stored)
    return stored


def group_params(w: torch.Tensor, symmetric: bool,
                 scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (scale_dtype) and uint8 zero of each row of w (rows, group) -> shapes (rows,)."""
    w = w.float()
    if symmetric:
        needed = w.abs().amax(dim=1) / 7
        scale = _round_up_to(needed, needed, scale_dtype)
        scale = torch.where(needed > 0, scale, torch.ones_like(scale))
        return scale, torch.full_like(scale, SYMMETRIC_ZERO, dtype=torch.uint8)
    low = w.amin(dim=1).clamp(max=0)
    high = w.amax(dim=1).clamp(min=0)
    needed = (high - low) / 15
    scale = _round_up_to(needed, needed, scale_dtype)
    scale = torch.where(needed > 0, scale, torch.ones_like(scale))
    zero = torch.round(-low / scale.float()).clamp(0, 15).to(torch.uint8)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (uint8) of w (rows, cols) under per-row scale/zero broadcast over the columns."""
    q = torch.round(w.float() / scale.float().unsqueeze(1)) + zero.float().unsqueeze(1)
    return q.clamp(0, 15).to(torch.uint8)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero.float().unsqueeze(1)) * scale.float().unsqueeze(1)


def check_weight(w: torch.Tensor, scale_dtype: torch.dtype) -> None:
    """Every quantizer's input: a non-empty 2-D floating-point weight with real values, finite everywhere."""
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point or w.dim() != 2:
        raise TypeError(f"w: expected a 2-D floating-point tensor (out_features, in_features), got "
                        f"{getattr(w, 'dtype', type(w).__name__)} {tuple(getattr(w, 'shape', ()))}")
    if scale_dtype not in SCALE_DTYPES:
        raise TypeError(f"scale_dtype: expected float16 or bfloat16, got {scale_dtype}")
    if w.device.type == "meta":
        raise ValueError("w: a meta tensor has no values to quantize; materialise the weight first")
    if w.numel() == 0:
        raise ValueError(f"w: expected a non-empty weight, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(f"w: expected finite values, found {bad} NaN/Inf; a NaN would vanish from its group and "
                         "an Inf turn the group into NaN")


def quantize_rtn(w: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                 scale_dtype: torch.dtype = torch.float16) -> Int4Weight:
    """W (N, K) -> Int4Weight by rounding every element to its group's nearest code."""
    check_weight(w, scale_dtype)
    n, k = w.shape
    group_size = resolve_group_size(group_size, k)
    groups = w.reshape(n * (k // group_size), group_size)
    scale, zero = group_params(groups, symmetric, scale_dtype)
    codes = quantize_codes(groups, scale, zero).reshape(n, k)
    return Int4Weight(pack_int4(codes), scale.reshape(n, -1), zero.reshape(n, -1), group_size, symmetric)
