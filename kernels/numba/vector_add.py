"""numba.cuda vector add: a grid-stride loop, one element per thread per step."""

from __future__ import annotations

import torch
from numba import cuda

from gpuforge.kernels import _alloc
from gpuforge.kernels.numba._interop import as_numba, launch_shape, stream_of


@cuda.jit
def _vector_add_kernel(a, b, out):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, out.size, stride):
        out[i] = a[i] + b[i]


def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    out = _alloc.empty_like(a)
    if out.numel():
        blocks, threads = launch_shape(out.numel(), threads=256, max_blocks=65535)
        flat = [as_numba(t.view(-1), name) for t, name in ((a, "a"), (b, "b"), (out, "out"))]
        _vector_add_kernel[blocks, threads, stream_of(out)](*flat)
    return out
