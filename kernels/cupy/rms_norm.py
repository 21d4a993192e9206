"""cupy backend of gf.rms_norm: csrc/rms_norm.cu through NVRTC, launched as its AOT launcher does."""

from __future__ import annotations

import torch

from gpuforge.kernels.cuda.rms_norm import backward_outputs, outputs
from gpuforge.kernels.cupy import module

MAX_THREADS = 512  # kRmsNormMaxThreads: threads per row block
BACKWARD_BLOCKS_PER_SM = 2  # kBackwardBlocksPerSm
SUM_THREADS = 256  # kSumPartialsThreads


def _threads(n: int, vec: int) -> int:
    """One thread per vec-wide chunk of a row, in whole warps, capped (csrc's rms_norm_threads)."""
    chunks = -(-n // vec)
    return min(MAX_THREADS, 32 * max(1, -(-chunks // 32)))


def _vec_width(n: int, element_size: int, *tensors: torch.Tensor | None) -> int:
    """16-byte vectors when every row start is 16-byte aligned (the launchers' rule), else one element."""
    width = 16 // element_size
    aligned = all(t is None or (t.data_ptr() % 16 == 0 and (t.dim() == 1 or t.stride(0) % width == 0))
                  for t in tensors)
    return width if n % width == 0 and aligned else 1


def _kernel(name: str):
    return module.kernel("rms_norm.cu", (name,), name)


def forward(x, weight, residual, eps):
    import numpy as np

    rows, n = x.shape
    y, h, rstd = outputs(x, residual is not None)
    if rows == 0:
        return y, h, rstd
    vec = _vec_width(n, x.element_size(), x, residual, weight, y, h)
    kern = _kernel(f"gpuforge::rms_norm_forward_kernel<{module.CPP_TYPES[x.dtype]}, {vec}, "
                   f"{str(residual is not None).lower()}>")
    res, h_out = (residual, h) if residual is not None else (x, y)
    c = module.as_cupy
    args = (c(x), np.int64(x.stride(0)), c(res), np.int64(res.stride(0)), c(weight), c(y), c(h_out), c(rstd),
            np.int64(n), np.float32(eps))
    module.launch(kern, (rows,), (_threads(n, vec),), args, x.device)
    return y, h, rstd


def backward(dy, x, weight, rstd, dh, deterministic):
    import numpy as np

    rows, n = x.shape
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    programs = max(1, min(rows, sms * BACKWARD_BLOCKS_PER_SM))
    dx, dw, partial = backward_outputs(x, weight, programs, deterministic)
    ctype = module.CPP_TYPES[x.dtype]
    c = module.as_cupy
    if rows:
        vec = _vec_width(n, x.element_size(), dy, x, weight, dx, dh)
        kern = _kernel(f"gpuforge::rms_norm_backward_kernel<{ctype}, {vec}, {str(dh is not None).lower()}, "
                       f"{str(not deterministic).lower()}>")
        smem = n * 4  # the block's fp32 partial dw row
        if smem > 48 * 1024:
            kern.max_dynamic_shared_size_bytes = smem
        dh_arg = dh if dh is not None else dy
        args = (c(dy), np.int64(dy.stride(0)), c(x), np.int64(x.stride(0)), c(weight), c(rstd), c(dh_arg),
                np.int64(dh_arg.stride(0)), c(dx), c(partial), np.int64(rows), np.int64(n))
        module.launch(kern, (programs,), (_threads(n, vec),), args, x.device, shared_mem=smem)
    column_sum = _kernel(f"gpuforge::rms_norm_sum_partials_kernel<{ctype}>")
    args = (c(partial), c(dw), np.int64(partial.shape[0]), np.int64(n))
    module.launch(column_sum, (-(-n // SUM_THREADS),), (SUM_THREADS,), args, x.device)
    return dx, dw
