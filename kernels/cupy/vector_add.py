"""cupy backend of gf.vector_add: csrc/vector_add.cu through NVRTC, with the AOT launcher's kernel and grid."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc
from gpuforge.kernels.cupy import module

THREADS = 256  # kVectorAddThreads of csrc/vector_add.cu


def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    import numpy as np

    a, b = a.contiguous(), b.contiguous()
    out = _alloc.empty_like(a)
    n = a.numel()
    if n == 0:
        return out
    ctype = module.CPP_TYPES[a.dtype]
    names = (f"gpuforge::vector_add_vec16_kernel<{ctype}>", f"gpuforge::vector_add_scalar_kernel<{ctype}>")
    vectorized = all(t.data_ptr() % 16 == 0 for t in (a, b, out))
    per_thread = 16 // a.element_size() if vectorized else 1
    work = -(-n // per_thread)
    blocks = min(-(-work // THREADS), 1 << 30)
    kern = module.kernel("vector_add.cu", names, names[0] if vectorized else names[1])
    args = tuple(module.as_cupy(t) for t in (a, b, out)) + (np.int64(n),)
    module.launch(kern, (blocks,), (THREADS,), args, a.device)
    return out
