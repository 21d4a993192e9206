"""One-call quantization of a weight matrix: `quantize_int4(w, group_size, method)` with RTN, GPTQ or AWQ."""

from __future__ import annotations

import torch

from gpuforge.kernels.int4_format import Int4Weight
from gpuforge.quant.awq import quantize_awq
from gpuforge.quant.gptq import quantize_gptq
from gpuforge.quant.rtn import quantize_rtn

METHODS = ("rtn", "gptq", "awq")


def quantize_int4(w: torch.Tensor, group_size: int = 128, method: str = "rtn",
                  calibration: torch.Tensor | None = None, symmetric: bool = True,
                  scale_dtype: torch.dtype = torch.float16) -> Int4Weight:
    """W (N, K) -> Int4Weight. group_size: 32, 64, 128, … dividing K, or -1 (per output channel).
    "gptq" and "awq" need `calibration`, the layer's input activations (..., K)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "rtn":
        return quantize_rtn(w, group_size, symmetric, scale_dtype)
    if calibration is None:
        raise ValueError(f"calibration: method {method!r} needs the layer's input activations (..., K)")
    quantizer = quantize_gptq if method == "gptq" else quantize_awq
    return quantizer(w, calibration, group_size, symmetric, scale_dtype)
