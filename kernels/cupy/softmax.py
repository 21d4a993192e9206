"""cupy backend of gf.softmax: csrc/softmax.cu through NVRTC, with launch_softmax_*'s choice by row length."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc
from gpuforge.kernels.cupy import module

WARPS_PER_BLOCK = 4  # kWarpsPerBlock: rows per block of the warp kernel
BLOCK_THREADS = 512  # kRowBlockThreads
MAX_CHUNKS = {"warp": 8, "fwd": 8, "bwd": 4}  # kMaxWarpChunks, kMaxBlockChunksFwd, kMaxBlockChunksBwd


def plan(kind: str, dtype: torch.dtype, n: int, vectorized: bool) -> tuple[str, int, int]:
    """(kernel name, threads per block, rows per block) for rows of n elements, as the C++ launcher chooses:
    one row per warp while n fits 8 chunks per lane, else one row per block, cached in registers while n fits
    the block's chunks, streamed (chunks = 0) beyond."""
    ctype = module.CPP_TYPES[dtype]
    vec = 16 // dtype.itemsize if vectorized else 1
    chunk_counts = (1, 2, 4, 8)
    if n <= 32 * MAX_CHUNKS["warp"] * vec:
        chunks = next(c for c in chunk_counts if n <= 32 * c * vec)
        return f"gpuforge::softmax_{kind}_warp_kernel<{ctype}, {chunks}, {vec}>", 32 * WARPS_PER_BLOCK, WARPS_PER_BLOCK
    fitting = [c for c in chunk_counts if c <= MAX_CHUNKS[kind] and n <= BLOCK_THREADS * c * vec]
    chunks = fitting[0] if fitting else 0
    return f"gpuforge::softmax_{kind}_block_kernel<{ctype}, {chunks}, {vec}>", BLOCK_THREADS, 1


def _launch(kind: str, tensors: tuple[torch.Tensor, ...], row_stride: int) -> None:
    """Launch the forward ("fwd": x, y) or backward ("bwd": dy, y, dx) kernel; the first tensor is a (rows, n)
    matrix with row stride `row_stride`, the others contiguous."""
    import numpy as np

    rows, n = tensors[0].shape
    vec = 16 // tensors[0].element_size()
    vectorized = all(t.data_ptr() % 16 == 0 for t in tensors) and row_stride % vec == 0 and n % vec == 0
    name, threads, rows_per_block = plan(kind, tensors[0].dtype, n, vectorized)
    kern = module.kernel("softmax.cu", (name,), name)
    first, *rest = (module.as_cupy(t) for t in tensors)
    args = (first, np.int64(row_stride), *rest, np.int64(rows), np.int64(n))
    module.launch(kern, (-(-rows // rows_per_block),), (threads,), args, tensors[0].device)


def forward(x: torch.Tensor) -> torch.Tensor:
    y = _alloc.empty_like(x)
    _launch("fwd", (x, y), x.stride(0))
    return y


def backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dx = _alloc.empty_like(y)
    _launch("bwd", (dy, y, dx), dy.stride(0))
    return dx
