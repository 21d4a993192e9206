"""cuda backend of gf.rms_norm: csrc/rms_norm.cu (a block per row forward; row bands with a partial dw row
per block in shared memory backward, then a fixed-order column sum or fp32 atomics)."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc
from gpuforge.kernels.cuda import extension


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _row_stride(t: torch.Tensor | None) -> int:
    return t.stride(0) if t is not None else 0


def outputs(x: torch.Tensor, with_h: bool):
    """(y, h or None, rstd) for (rows, n) inputs: the forward's outputs, shared with the cupy launcher."""
    rows, n = x.shape
    y = _alloc.empty((rows, n), dtype=x.dtype, device=x.device)
    h = _alloc.empty((rows, n), dtype=x.dtype, device=x.device) if with_h else None
    return y, h, _alloc.empty((rows,), dtype=torch.float32, device=x.device)


def backward_outputs(x: torch.Tensor, weight: torch.Tensor, programs: int, deterministic: bool):
    """(dx, dw, partial): partial holds one fp32 dw row per program (deterministic) or one zeroed row the
    programs add into with atomics."""
    rows, n = x.shape
    dx = _alloc.empty((rows, n), dtype=x.dtype, device=x.device)
    dw = _alloc.empty((n,), dtype=weight.dtype, device=x.device)
    partial = _alloc.empty((programs if deterministic else 1, n), dtype=torch.float32, device=x.device)
    if not deterministic or rows == 0:
        partial.zero_()  # the atomic form adds into it; with no rows it is the whole (zero) gradient
    return dx, dw, partial


def forward(x, weight, residual, eps):
    rows, n = x.shape
    y, h, rstd = outputs(x, residual is not None)
    extension.call("rms_norm_forward", x.device, x.data_ptr(), x.stride(0), _ptr(residual), _row_stride(residual),
                   weight.data_ptr(), y.data_ptr(), _ptr(h), rstd.data_ptr(), rows, n, float(eps),
                   extension.dtype_code(x))
    return y, h, rstd


def backward(dy, x, weight, rstd, dh, deterministic):
    rows, n = x.shape
    blocks = extension.query("rms_norm_backward_blocks", rows, x.device.index or 0)
    dx, dw, partial = backward_outputs(x, weight, blocks, deterministic)
    extension.call("rms_norm_backward", x.device, dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0),
                   weight.data_ptr(), rstd.data_ptr(), _ptr(dh), _row_stride(dh), dx.data_ptr(), dw.data_ptr(),
                   partial.data_ptr(), blocks, rows, n, bool(deterministic), extension.dtype_code(x))
    return dx, dw
