"""numba.cuda softmax over the last dim: one row per block, fp32 arithmetic, float32/float16.

Each thread walks the row with a block-sized stride, keeping a private partial (max, then sum, or the dot
Σ dy⊙y in the backward); the THREADS partials meet in a shared-memory tree reduction, and the result is
broadcast to every thread through shared element 0. The row is read from global memory once per reduction
and once more to write, which is simple rather than fastest (the Triton and CUDA C++ kernels keep it on chip).
A fully masked row (all −inf) gives NaN, as torch.softmax does.
"""

from __future__ import annotations

import functools
import math

import torch
from numba import cuda, float32

from gpuforge.kernels import _alloc
from gpuforge.kernels.backends import numba_simulator_on
from gpuforge.kernels.numba._interop import as_numba, stream_of


def threads_per_block() -> int:
    """A power of two, for the tree reduction; the simulator runs one Python thread per CUDA thread, so it gets
    a few (still three levels of the tree)."""
    return 8 if numba_simulator_on() else 256


@functools.cache
def _kernels(threads: int):
    """(forward, backward) kernels for blocks of `threads` threads (a compile-time constant of each)."""

    @cuda.jit(device=True)
    def block_reduce(partials, value, take_max):
        """Tree reduction of each thread's `value` over the block in shared memory; all threads get the result."""
        tid = cuda.threadIdx.x
        partials[tid] = value
        cuda.syncthreads()
        half = threads // 2
        while half > 0:
            if tid < half:
                other = partials[tid + half]
                partials[tid] = max(partials[tid], other) if take_max else partials[tid] + other
            cuda.syncthreads()
            half //= 2
        result = partials[0]
        cuda.syncthreads()  # partials is reused by the next reduction
        return result

    @cuda.jit
    def softmax_fwd_kernel(x, y):
        """x, y (rows, n); grid (rows,), block (threads,): y[r] = exp(x[r] − max) / Σ exp(x[r] − max)."""
        partials = cuda.shared.array(threads, float32)
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        n = x.shape[1]
        local = float32(-math.inf)
        for j in range(tid, n, threads):
            local = max(local, float32(x[row, j]))
        row_max = block_reduce(partials, local, True)
        local = float32(0.0)
        for j in range(tid, n, threads):
            local += math.exp(float32(x[row, j]) - row_max)
        row_sum = block_reduce(partials, local, False)
        for j in range(tid, n, threads):
            y[row, j] = math.exp(float32(x[row, j]) - row_max) / row_sum

    @cuda.jit
    def softmax_bwd_kernel(dy, y, dx):
        """dy, y, dx (rows, n); grid (rows,), block (threads,): dx[r] = y[r] ⊙ (dy[r] − Σ dy[r]⊙y[r])."""
        partials = cuda.shared.array(threads, float32)
        row = cuda.blockIdx.x
        tid = cuda.threadIdx.x
        n = y.shape[1]
        local = float32(0.0)
        for j in range(tid, n, threads):
            local += float32(dy[row, j]) * float32(y[row, j])
        dot = block_reduce(partials, local, False)
        for j in range(tid, n, threads):
            dx[row, j] = float32(y[row, j]) * (float32(dy[row, j]) - dot)

    return softmax_fwd_kernel, softmax_bwd_kernel


def forward(x: torch.Tensor) -> torch.Tensor:
    """x (rows, n) -> contiguous y."""
    x = x.contiguous()
    y = _alloc.empty_like(x)
    threads = threads_per_block()
    _kernels(threads)[0][x.shape[0], threads, stream_of(y)](as_numba(x, "x"), as_numba(y, "y"))
    return y


def backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dy, y (rows, n) -> contiguous dx."""
    dy, y = dy.contiguous(), y.contiguous()
    dx = _alloc.empty_like(y)
    threads = threads_per_block()
    _kernels(threads)[1][dy.shape[0], threads, stream_of(dx)](as_numba(dy, "grad"), as_numba(y, "y"),
                                                              as_numba(dx, "dx"))
    return dx
