"""cupy backend of gf.matmul: csrc/matmul.cu through NVRTC, with the AOT launcher's choice of kernel."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc
from gpuforge.kernels.cuda.hopper import rows_aligned
from gpuforge.kernels.cuda.matmul import for_tensor_cores
from gpuforge.kernels.cupy import module

# Block tiles and threads of csrc/matmul.cu's kernels (kTiledBlockM/N, kTiledThreads; kMma…).
TILED_TILE, TILED_THREADS = 64, 256
MMA_TILE, MMA_THREADS = 128, 256


def mma_path_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The AOT launcher's test (csrc/matmul.cu, mma_path_applies): fp16/bf16 on sm_80+, rows contiguous and
    16-byte aligned."""
    return (a.dtype != torch.float32 and a.shape[2] % 8 == 0 and b.shape[2] % 8 == 0
            and rows_aligned(a) and rows_aligned(b) and torch.cuda.get_device_capability(a.device)[0] >= 8)


def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import numpy as np

    a, b = for_tensor_cores(a, b)
    batch, m, k = a.shape
    n = b.shape[2]
    out = _alloc.empty((batch, m, n), dtype=a.dtype, device=a.device)
    ctype = module.CPP_TYPES[a.dtype]
    tiled, mma = f"gpuforge::matmul_tiled_kernel<{ctype}>", f"gpuforge::matmul_mma_kernel<{ctype}>"
    names = (tiled,) if a.dtype == torch.float32 else (tiled, mma)  # one NVRTC module per dtype
    if mma_path_applies(a, b):
        kern = module.kernel("matmul.cu", names, mma)
        grid = (-(-m // MMA_TILE) * -(-n // MMA_TILE), batch)
        sizes = (m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1))
        threads = MMA_THREADS
    else:
        kern = module.kernel("matmul.cu", names, tiled)
        grid = (-(-m // TILED_TILE) * -(-n // TILED_TILE), batch)
        sizes = (m, n, k, *a.stride(), *b.stride())
        threads = TILED_THREADS
    args = (module.as_cupy(a), module.as_cupy(b), module.as_cupy(out), *(np.int64(v) for v in sizes))
    module.launch(kern, grid, (threads,), args, a.device)
    return out
