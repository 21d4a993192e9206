"""Triton RMSNorm: forward saving 1/rms per row, backward for x and weight with a two-pass weight gradient.

Rows are normalised whole in registers (BLOCK_SIZE = next power of two ≥ n; the op's table caps n), statistics in
fp32 whatever the input dtype. The backward gives each program a contiguous band of rows: it writes dx row by
row and keeps its share of dw = Σ dy·x̂ in fp32 registers, stored once as one partial row; a second kernel sums
the partial rows in a fixed order (deterministic), or, with deterministic=False, the programs add their
partial rows into one fp32 row with atomics (order varies from run to run, bits may too).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc
from gpuforge.kernels.triton._partials import bands, sum_partials, sum_partials_variants


@triton.jit
def _rms_norm_fwd_kernel(
    x_ptr,  # input rows, last dim contiguous
    x_row_stride,
    res_ptr,  # residual rows (read only when HAS_RESIDUAL)
    res_row_stride,
    w_ptr,  # weight (n,)
    y_ptr,  # output rows, contiguous
    h_ptr,  # x + residual, contiguous (written only when HAS_RESIDUAL)
    rstd_ptr,  # fp32 (rows,): 1/rms of each row, saved for the backward
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row: load the row (and residual row) once, add, reduce Σx² in fp32, scale, store."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_row_stride + cols, mask=mask, other=0.0)
        # round the sum to the stream dtype first: the norm sees the h it returns, which the backward reuses
        x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * n_cols + cols, x, mask=mask)
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,  # upstream gradient rows, last dim contiguous
    dy_row_stride,
    x_ptr,  # the normalised input rows (h for the fused residual form)
    x_row_stride,
    w_ptr,  # weight (n,)
    rstd_ptr,  # fp32 (rows,) from the forward
    dh_ptr,  # gradient arriving at h, added to dx (read only when HAS_DH)
    dh_row_stride,
    dx_ptr,  # output rows, contiguous
    dw_partial_ptr,  # fp32 (programs, n) partial sums, or (1, n) zeroed for the atomic form
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DH: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """A band of rows per program: dx = rstd·(g − x̂·mean(g·x̂)), g = dy·w; dw accumulated in fp32 registers."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        g = dy * w
        dx = rstd * (g - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        if HAS_DH:
            dx += tl.load(dh_ptr + row * dh_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    if ATOMIC:
        tl.atomic_add(dw_partial_ptr + cols, dw, mask=mask)
    else:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)


def _settings(n: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps): ~8-16 elements per thread keeps loads 16-byte wide without spilling."""
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 16) if block >= 256 else 1


def forward(x, weight, residual, eps):
    rows, n = x.shape
    y = _alloc.empty((rows, n), dtype=x.dtype, device=x.device)
    h = _alloc.empty((rows, n), dtype=x.dtype, device=x.device) if residual is not None else None
    rstd = _alloc.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        block, warps = _settings(n)
        res = residual if residual is not None else x
        _rms_norm_fwd_kernel[(rows,)](
            x, x.stride(0), res, res.stride(0), weight, y, h if h is not None else y, rstd, n, eps,
            HAS_RESIDUAL=residual is not None, BLOCK_SIZE=block, num_warps=warps)
    return y, h, rstd


def backward(dy, x, weight, rstd, dh, deterministic):
    rows, n = x.shape
    dx = _alloc.empty((rows, n), dtype=x.dtype, device=x.device)
    dw = _alloc.empty((n,), dtype=weight.dtype, device=x.device)
    programs = bands(rows, x.device)
    partial = _alloc.empty((programs if deterministic else 1, n), dtype=torch.float32, device=x.device)
    if not deterministic or not rows:
        partial.zero_()
    if rows:
        block, warps = _settings(n)
        dh_arg = dh if dh is not None else dy
        _rms_norm_bwd_kernel[(programs,)](
            dy, dy.stride(0), x, x.stride(0), weight, rstd, dh_arg, dh_arg.stride(0), dx, partial, rows, n,
            triton.cdiv(rows, programs), HAS_DH=dh is not None, ATOMIC=not deterministic, BLOCK_SIZE=block,
            num_warps=warps)
    return dx, sum_partials(partial, dw)



def compile_variants() -> list:
    """Every block the host wrappers can choose (next_power_of_2(n) up to the 64K the op's table allows), with
    and without the fused residual (forward) and dh / atomics (backward), per dtype (kernels/triton/_variants.py)."""
    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    for dtype in ("float32", "float16", "bfloat16"):
        for block in (1 << i for i in range(17)):
            warps = _settings(block)[1]
            for residual in (False, True):
                constexprs = {"HAS_RESIDUAL": residual, "BLOCK_SIZE": block}
                pointers = {"x_ptr": dtype, "res_ptr": dtype, "w_ptr": dtype, "y_ptr": dtype, "h_ptr": dtype,
                            "rstd_ptr": "float32"}
                sig = signature(_rms_norm_fwd_kernel, constexprs, pointers, floats=("eps",))
                out.append(Variant("rms_norm", _rms_norm_fwd_kernel, sig, constexprs, warps, 3,
                                   f"{dtype} BLOCK_SIZE={block} residual={residual}"))
            for dh in (False, True):
                for atomic in (False, True):
                    constexprs = {"HAS_DH": dh, "ATOMIC": atomic, "BLOCK_SIZE": block}
                    pointers = {"dy_ptr": dtype, "x_ptr": dtype, "w_ptr": dtype, "rstd_ptr": "float32",
                                "dh_ptr": dtype, "dx_ptr": dtype, "dw_partial_ptr": "float32"}
                    sig = signature(_rms_norm_bwd_kernel, constexprs, pointers, generic=("n_rows", "rows_per_program"))
                    out.append(Variant("rms_norm", _rms_norm_bwd_kernel, sig, constexprs, warps, 3,
                                       f"{dtype} BLOCK_SIZE={block} dh={dh} atomic={atomic}"))
    return out + sum_partials_variants("rms_norm")
