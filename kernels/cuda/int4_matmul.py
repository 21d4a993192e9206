"""cuda backend of gf.int4_matmul: csrc/int4_matmul.cu, the decode kernel (M ≤ 16, split-K) or the tiled
kernel (any M); fp16/bf16 activations."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc
from gpuforge.kernels.cuda import extension

DECODE_MAX_M = 16  # the decode kernel takes up to this many rows; more rows go to the tiled kernel


def split_k(m: int, n: int, k: int, group_size: int) -> int:
    """K slices for the decode kernel: enough blocks (8 output channels each) to fill ~132 SMs a few times
    over, each slice a whole number of 32-element chunks and at least 256 long."""
    blocks = -(-n // 8)
    split = 1
    while blocks * split < 4 * 132 and k % (split * 2 * 32) == 0 and k // (split * 2) >= 256:
        split *= 2
    return split


def forward(x, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    m, k = x.shape
    n = qweight.shape[0]
    out = _alloc.empty((m, n), dtype=x.dtype, device=x.device)
    decode = (m <= DECODE_MAX_M and k % 32 == 0 and group_size % 32 == 0
              and x.data_ptr() % 16 == 0 and qweight.data_ptr() % 16 == 0)
    split = split_k(m, n, k, group_size) if decode else 0
    workspace = torch.empty((split, m, n) if split > 1 else (0,), dtype=torch.float32, device=x.device)
    extension.call("int4_matmul", x.device, x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
                   out.data_ptr(), workspace.data_ptr(), m, n, k, group_size, split, extension.dtype_code(x),
                   extension.dtype_code(scales))
    return out
