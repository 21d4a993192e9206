"""cuda backend of gf.softmax: csrc/softmax.cu (a warp, a block or a streaming block per row, by row length)."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc
from gpuforge.kernels.cuda import extension


def forward(x: torch.Tensor) -> torch.Tensor:
    """x (rows, n) with a contiguous last dim -> contiguous y."""
    y = _alloc.empty_like(x)
    extension.call("softmax_forward", x.device, x.data_ptr(), x.stride(0), y.data_ptr(), x.shape[0], x.shape[1],
                   extension.dtype_code(x))
    return y


def backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dy (rows, n) with a contiguous last dim, y contiguous -> contiguous dx."""
    dx = _alloc.empty_like(y)
    extension.call("softmax_backward", y.device, dy.data_ptr(), dy.stride(0), y.data_ptr(), dx.data_ptr(),
                   dy.shape[0], dy.shape[1], extension.dtype_code(y))
    return dx
