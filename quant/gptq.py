"""GPTQ (Frantar et al., 2022): quantize W one input column at a time, pushing each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's squared output error.

For a layer y = x Wᵀ and calibration inputs X (n, K), the error ‖X Wᵀ − X Ŵᵀ‖² has Hessian H = 2 XᵀX / n
(per output row, the same for all rows). With U the upper Cholesky factor of H⁻¹ (after dampening H by
`damp` · mean(diag H)), quantizing column i with error e = (w_i − q_i) / U_ii and updating the later
columns by −e · U_i,i+1: is the optimal (OBS) compensation. Updates are applied lazily: within a block of
`block_size` columns they touch only the block, and the block's accumulated errors reach the rest of W in
one matrix product when the block is done (that is what makes it fast on big layers). Each group's scale
and zero are chosen from the already-updated weights when quantization reaches the group's first column.
"""

from __future__ import annotations

import torch

from gpuforge.kernels.int4_format import Int4Weight, pack_int4, resolve_group_size
from gpuforge.quant.rtn import check_weight, dequantize_codes, group_params, quantize_codes


def hessian(calibration: torch.Tensor, k: int) -> torch.Tensor:
    """H = 2 XᵀX / n in float64 from activations (..., K)."""
    if calibration.shape[-1] != k:
        raise ValueError(f"calibration: expected activations with last dim K={k}, "
                         f"got {tuple(calibration.shape)}")
    x = calibration.reshape(-1, k).double()
    if x.shape[0] == 0:
        raise ValueError("calibration: expected at least one activation row")
    return 2 * x.T @ x / x.shape[0]


def inverse_hessian_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·mean(diag H)·I)⁻¹; dead inputs (zero diagonal) get diagonal 1."""
    h = h.clone()
    diag = torch.arange(h.shape[0], device=h.device)
    h[diag, diag] = torch.where(h.diagonal() == 0, torch.ones_like(h.diagonal()), h.diagonal())
    h[diag, diag] += damp * h.diagonal().mean()
    h_inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(h_inv, upper=True)


def quantize_gptq(w: torch.Tensor, calibration: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                  scale_dtype: torch.dtype = torch.float16, damp: float = 0.01,
                  block_size: int = 128) -> Int4Weight:
    """W (N, K) and calibration activations (..., K) -> Int4Weight."""
    check_weight(w, scale_dtype)
    if not isinstance(calibration, torch.Tensor):
        raise TypeError("calibration: GPTQ needs a tensor of the layer's input activations (..., K)")
    n, k = w.shape
    group_size = resolve_group_size(group_size, k)
    h = hessian(calibration.to(w.device), k)
    dead = h.diagonal() == 0
    u = inverse_hessian_cholesky(h, damp).float()
    work = w.detach().float().clone()
    work[:, dead] = 0
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales = torch.empty(n, k // group_size, dtype=scale_dtype, device=w.device)
    zeros = torch.empty(n, k // group_size, dtype=torch.uint8, device=w.device)

    for start in range(0, k, block_size):
        stop = min(start + block_size, k)
        block = work[:, start:stop].clone()
        errors = torch.empty_like(block)
        u_block = u[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            if col % group_size == 0:  # the group's parameters, from weights updated so far
                upcoming = torch.cat((block[:, i:], work[:, stop:]), dim=1)[:, :group_size]
                scale, zero = group_params(upcoming, symmetric, scale_dtype)
                scales[:, col // group_size], zeros[:, col // group_size] = scale, zero
            column = block[:, i:i + 1]
            q = quantize_codes(column, scale, zero)
            codes[:, col] = q[:, 0]
            err = (column - dequantize_codes(q, scale, zero)) / u_block[i, i]
            block[:, i:] -= err * u_block[i, i:].unsqueeze(0)
            errors[:, i] = err[:, 0]
        work[:, stop:] -= errors @ u[start:stop, stop:]

    return Int4Weight(pack_int4(codes), scales, zeros, group_size, symmetric)
