"""cupy backend of gf.int4_matmul: the tiled kernel of csrc/int4_matmul.cu through NVRTC (any M)."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc
from gpuforge.kernels.cupy import module

TILE_M, TILE_N, THREADS = 64, 64, 256  # kTileM, kTileN, kThreads of the tiled kernel


def forward(x, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    import numpy as np

    m, k = x.shape
    n = qweight.shape[0]
    out = _alloc.empty((m, n), dtype=x.dtype, device=x.device)
    types = module.CPP_TYPES
    name = f"gpuforge::int4_matmul_tiled_kernel<{types[x.dtype]}, {types[scales.dtype]}>"
    kern = module.kernel("int4_matmul.cu", (name,), name)
    grid = (-(-n // TILE_N), -(-m // TILE_M))
    args = (*(module.as_cupy(t) for t in (x, qweight, scales, zeros, out)),
            *(np.int64(v) for v in (m, n, k, group_size)))
    module.launch(kern, grid, (THREADS,), args, x.device)
    return out
