"""AWQ (Lin et al., 2023): activation-aware per-input-channel scaling, then RTN.

Input channels with large activations matter most to the output, so they are scaled up before rounding
(their relative rounding error shrinks) and the activations scaled down by the same factor, which leaves the
layer's function unchanged: x Wᵀ = (x / s)(W diag s)ᵀ. The scales are s = mean|x|^α, normalised to a
geometric mean of 1; α is chosen on a grid in [0, 1] by the output error on the calibration activations
(α = 0 is plain RTN, so the search never does worse than RTN on that data). The chosen s is stored as the
Int4Weight's `in_scales`: the codes quantize W diag s, and the GEMM divides the activations by s.
"""

from __future__ import annotations

import torch

from gpuforge.kernels.int4_format import Int4Weight, dequantize_int4
from gpuforge.quant.rtn import check_weight, quantize_rtn


def output_error(x: torch.Tensor, w: torch.Tensor, qweight: Int4Weight) -> float:
    """‖x Wᵀ − x Ŵᵀ‖² / ‖x Wᵀ‖² in float64 (x: (n, K) activations)."""
    x, w = x.double(), w.double()
    ref = x @ w.T
    return float(((ref - x @ dequantize_int4(qweight, torch.float64).T) ** 2).sum() / (ref ** 2).sum())


def quantize_awq(w: torch.Tensor, calibration: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                 scale_dtype: torch.dtype = torch.float16, grid: int = 20) -> Int4Weight:
    """W (N, K) and calibration activations (..., K) -> Int4Weight with `in_scales` set."""
    check_weight(w, scale_dtype)
    if not isinstance(calibration, torch.Tensor):
        raise TypeError("calibration: AWQ needs a tensor of the layer's input activations (..., K)")
    k = w.shape[1]
    if calibration.shape[-1] != k:
        raise ValueError(f"calibration: expected activations with last dim K={k}, "
                         f"got {tuple(calibration.shape)}")
    x = calibration.to(w.device).reshape(-1, k).float()
    magnitude = x.abs().mean(dim=0).clamp(min=1e-8)
    w = w.detach().float()
    best, best_error = None, float("inf")
    for alpha in torch.linspace(0, 1, grid + 1).tolist():
        s = magnitude.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        candidate = quantize_rtn(w * s, group_size, symmetric, scale_dtype)
        candidate.in_scales = s
        candidate.validate()
        error = output_error(x, w, candidate)
        if error < best_error:
            best, best_error = candidate, error
    return best
