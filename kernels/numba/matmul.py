"""numba.cuda batched matmul: the classic shared-memory tiled kernel, fp32 accumulation, fp32/fp16.

A TILE × TILE block of threads computes a TILE × TILE tile of C[z]: per step it copies one TILE × TILE tile of
A and one of B into shared memory (each thread one element of each, converted to fp32), synchronises, and
every thread accumulates its dot product over the tile from shared memory, so each global element is read
by one thread instead of TILE. Inputs are made contiguous first (the simulator cannot move strided buffers).
"""

from __future__ import annotations

import functools

import torch
from numba import cuda, float32

from gpuforge.kernels import _alloc
from gpuforge.kernels.backends import numba_simulator_on
from gpuforge.kernels.numba._interop import as_numba, stream_of


def tile_size() -> int:
    """16 × 16 = 256 threads on a GPU; the simulator runs one Python thread per CUDA thread, so it gets 8 × 8."""
    return 8 if numba_simulator_on() else 16


@functools.cache
def _kernel(tile: int):
    """The tiled kernel for `tile` × `tile` blocks (a compile-time constant: it sizes the shared tiles)."""

    @cuda.jit
    def matmul_tiled_kernel(a, b, c):
        """a (batch, M, K), b (batch, K, N) -> c (batch, M, N); grid (cdiv(N, tile), cdiv(M, tile), batch)."""
        a_tile = cuda.shared.array((tile, tile), float32)
        b_tile = cuda.shared.array((tile, tile), float32)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        col = cuda.blockIdx.x * tile + tx
        row = cuda.blockIdx.y * tile + ty
        z = cuda.blockIdx.z
        m, k = a.shape[1], a.shape[2]
        n = b.shape[2]
        acc = float32(0.0)
        for k0 in range(0, k, tile):
            # Out-of-range elements load as zero, so the inner loop needs no bounds checks.
            a_tile[ty, tx] = float32(a[z, row, k0 + tx]) if row < m and k0 + tx < k else float32(0.0)
            b_tile[ty, tx] = float32(b[z, k0 + ty, col]) if k0 + ty < k and col < n else float32(0.0)
            cuda.syncthreads()
            for i in range(tile):
                acc += a_tile[ty, i] * b_tile[i, tx]
            cuda.syncthreads()  # the next step overwrites the tiles
        if row < m and col < n:
            c[z, row, col] = acc

    return matmul_tiled_kernel


def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (batch, M, K) @ b (batch, K, N) -> contiguous (batch, M, N); float32/float16."""
    a, b = a.contiguous(), b.contiguous()
    batch, m, _ = a.shape
    n = b.shape[2]
    na, nb = as_numba(a, "a"), as_numba(b, "b")
    out = _alloc.empty((batch, m, n), dtype=a.dtype, device=a.device)
    tile = tile_size()
    grid = ((n + tile - 1) // tile, (m + tile - 1) // tile, batch)
    _kernel(tile)[grid, (tile, tile), stream_of(out)](na, nb, as_numba(out, "out"))
    return out
