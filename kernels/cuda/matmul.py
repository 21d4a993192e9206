"""cuda backend of gf.matmul: csrc/matmul.cu, mma.sync tensor cores for fp16/bf16 with 16-byte-aligned rows,
the shared-memory tiled kernel otherwise."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc
from gpuforge.kernels.cuda import extension


def rows_aligned(t: torch.Tensor) -> bool:
    """Rows contiguous and 16-byte aligned: what cp.async and ldmatrix need (csrc/matmul.cu)."""
    return t.stride(2) == 1 and t.stride(1) % 8 == 0 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0


def for_tensor_cores(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16/bf16 operands with K and N multiples of 8 are copied row-major when they are not already (the
    backward's Bᵀ and Aᵀ, transposed views): an O(MK + KN) copy that moves the O(MNK) product onto tensor
    cores. Anything else keeps its strides and takes the tiled kernel."""
    if a.dtype == torch.float32 or a.shape[2] % 8 or b.shape[2] % 8:
        return a, b
    return (a if rows_aligned(a) else a.contiguous()), (b if rows_aligned(b) else b.contiguous())


def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = for_tensor_cores(a, b)
    batch, m, k = a.shape
    n = b.shape[2]
    out = _alloc.empty((batch, m, n), dtype=a.dtype, device=a.device)
    extension.call("matmul", a.device, a.data_ptr(), b.data_ptr(), out.data_ptr(), m, n, k, batch, *a.stride(),
                   *b.stride(), extension.dtype_code(a))
    return out
