"""cuda backend of gf.matmul: csrc/matmul.cu, mma.sync tensor cores for fp16/bf16 with 16-byte-aligned rows,
the shared-memory tiled kernel otherwise; on a compute capability 9.0 device with GPUFORGE_CUDA_WGMMA=1, the
same operands take csrc/matmul_wgmma.cu's TMA + wgmma kernel (opt-in: kernels/cuda/hopper.py)."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc
from gpuforge.kernels.cuda import extension
from gpuforge.kernels.cuda.hopper import rows_aligned, wgmma_enabled


def for_tensor_cores(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16/bf16 operands with K and N multiples of 8 are copied row-major when they are not already (the
    backward's Bᵀ and Aᵀ, transposed views): an O(MK + KN) copy that moves the O(MNK) product onto tensor
    cores. Anything else keeps its strides and takes the tiled kernel."""
    if a.dtype == torch.float32 or a.shape[2] % 8 or b.shape[2] % 8:
        return a, b
    return (a if rows_aligned(a) else a.contiguous()), (b if rows_aligned(b) else b.contiguous())


def forward(a: torch.Tensor, b: torch.Tensor, wgmma: bool | None = None) -> torch.Tensor:
    """(batch, M, K) @ (batch, K, N). wgmma: None lets GPUFORGE_CUDA_WGMMA decide; True asks for the sm_90a
    kernel (the benchmark's row; an operand it cannot take is an error), False for csrc/matmul.cu."""
    a, b = for_tensor_cores(a, b)
    batch, m, k = a.shape
    n = b.shape[2]
    out = _alloc.empty((batch, m, n), dtype=a.dtype, device=a.device)
    fits = a.dtype != torch.float32 and k % 8 == 0 and n % 8 == 0 and rows_aligned(a) and rows_aligned(b)
    hopper = fits and wgmma_enabled(a.device) if wgmma is None else wgmma  # explicit: the launcher checks
    extension.call("matmul_wgmma" if hopper else "matmul", a.device, a.data_ptr(), b.data_ptr(), out.data_ptr(), m, n,
                   k, batch, *a.stride(), *b.stride(), extension.dtype_code(a))
    return out
