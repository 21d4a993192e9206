"""torch tensors as numba.cuda arrays: zero-copy views on a GPU, NumPy views under the simulator (CPU)."""

from __future__ import annotations

import torch
from numba import cuda

from gpuforge.kernels.backends import numba_simulator_on


def as_numba(t: torch.Tensor, name: str):
    if t.dtype == torch.bfloat16:
        raise TypeError(f"{name}: the numba backend has no bfloat16 (NumPy and numba lack it); "
                        "use float32/float16 or another backend")
    t = t.detach()
    return t.numpy() if t.device.type == "cpu" else cuda.as_cuda_array(t)


def stream_of(t: torch.Tensor):
    """torch's current stream as a numba stream, so numba kernels order with torch work (0 on the simulator)."""
    if t.device.type != "cuda":
        return 0
    return cuda.external_stream(torch.cuda.current_stream(t.device).cuda_stream)


def launch_shape(n_items: int, threads: int, max_blocks: int) -> tuple[int, int]:
    """(blocks, threads) for a grid-stride loop over n_items; the simulator runs a thread per Python thread,
    so it gets a single small block."""
    if numba_simulator_on():
        return 1, min(threads, 32)
    return max(1, min((n_items + threads - 1) // threads, max_blocks)), threads
