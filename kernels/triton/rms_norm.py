"""Triton RMSNorm: forward saving 1/rms per row, backward for x and weight with a two-pass weight gradient.

Statistics are fp32 whatever the input dtype. Choice by width (`gpuforge inspect` checks every launch below
for spills on sm_80 and sm_90):
- forward: rows up to MAX_ONE_PASS_FWD = 16K elements are normalised whole in registers (BLOCK_SIZE = next
  power of two ≥ n): x (and the residual) read once, y (and h) written once. At 32K the fp32 one-pass kernel
  spilled 8 B per thread on sm_90 (64 values per thread at the 16-warp cap; 64K spilled everywhere), so wider
  rows, of any width, are looped over WIDE_BLOCK-sized column chunks: pass 1 sums x² per lane (writing
  h = x + residual), pass 2 reads the row again (h itself when there is a residual) and writes y: two reads,
  one write per element.
- backward: rows up to MAX_ONE_PASS_BWD = 8K are held whole (dy and x read once): at 16K the one-pass kernel
  spilled 168-1320 B per thread (it holds dy, x, w and the dw partial row). Wider rows take two kernels: one
  program per row streams dy and x for mean(g·x̂), then a (band of rows × column block) grid writes dx and the
  band's partial dw columns: dy and x read twice each.
Each backward program owns a contiguous band of rows and keeps its share of dw = Σ dy·x̂ in fp32 registers,
stored once as one partial row; a second kernel sums the partial rows in a fixed order (deterministic), or,
with deterministic=False, the programs add their partial rows into one fp32 row with atomics (order varies from
run to run, bits may too).
"""

from __future__ import annotations

from itertools import product

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


@triton.jit
def _rms_norm_wide_fwd_kernel(
    x_ptr, x_row_stride, res_ptr, res_row_stride, w_ptr, y_ptr, h_ptr, rstd_ptr,  # as in _rms_norm_fwd_kernel
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row, streamed in BLOCK_SIZE chunks (only a chunk in registers). Pass 1 keeps Σx² per lane
    in fp32 and writes h = x + residual; pass 2 reads x (or the h it wrote: one read instead of x and the
    residual) and writes y."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    sum_sq = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        mask = offsets < n_cols
        x = tl.load(x_ptr + row * x_row_stride + offsets, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + row * res_row_stride + offsets, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + row * n_cols + offsets, x, mask=mask)
        x = x.to(tl.float32)
        sum_sq += x * x
    rstd = 1.0 / tl.sqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
    if HAS_RESIDUAL:
        tl.debug_barrier()  # h is read back below: every thread's pass-1 stores are visible to the block
        src_ptr = h_ptr
        src_row_stride = n_cols
    else:
        src_ptr = x_ptr
        src_row_stride = x_row_stride
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        mask = offsets < n_cols
        x = tl.load(src_ptr + row * src_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * n_cols + offsets, (x * rstd * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_norm_row_dot_kernel(
    dy_ptr, dy_row_stride, x_ptr, x_row_stride, w_ptr, rstd_ptr,  # as in _rms_norm_bwd_kernel
    c_ptr,  # fp32 (rows,) output: mean(g·x̂) of each row, g = dy·w
    n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    """Wide rows, first backward pass: one program per row streams dy, x and w in chunks, keeping per-lane fp32
    sums of g·x̂, reduced once at the end."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    rstd = tl.load(rstd_ptr + row)
    acc = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        mask = offsets < n_cols
        dy = tl.load(dy_ptr + row * dy_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        acc += dy * w * x
    tl.store(c_ptr + row, tl.sum(acc, axis=0) * rstd / n_cols)


@triton.jit
def _rms_norm_columns_bwd_kernel(
    dy_ptr, dy_row_stride, x_ptr, x_row_stride, w_ptr, rstd_ptr,  # as in _rms_norm_bwd_kernel
    c_ptr,  # fp32 (rows,) from _rms_norm_row_dot_kernel
    dh_ptr, dh_row_stride, dx_ptr, dw_partial_ptr,  # as in _rms_norm_bwd_kernel
    n_rows,
    n_cols,
    rows_per_program,
    HAS_DH: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Wide rows, second backward pass: program (band, column block) writes dx = rstd·(g − x̂·c) for its columns
    of its rows and keeps the band's Σ dy·x̂ for those columns in fp32 registers, stored once."""
    band = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = band * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = x * rstd
        dx = rstd * (dy * w - xhat * tl.load(c_ptr + row))
        if HAS_DH:
            dx += tl.load(dh_ptr + row * dh_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
    if ATOMIC:
        tl.atomic_add(dw_partial_ptr + cols, dw, mask=mask)
    else:
        tl.store(dw_partial_ptr + band * n_cols + cols, dw, mask=mask)


# Widest rows the one-pass kernels hold in registers without spilling on sm_80/sm_90 (module docstring);
# wider rows are looped over WIDE_BLOCK-sized chunks, WIDE_WARPS warps per program (8 per thread).
MAX_ONE_PASS_FWD = 16384
MAX_ONE_PASS_BWD = 8192
WIDE_BLOCK = 4096
WIDE_WARPS = 16


def _settings(n: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) of a one-pass launch: ~8-16 elements per thread keeps loads 16-byte wide."""
    block = triton.next_power_of_2(n)
    return block, min(max(block // 256, 1), 16) if block >= 256 else 1


def forward(x, weight, residual, eps, *, max_one_pass: int = MAX_ONE_PASS_FWD, block: int = WIDE_BLOCK):
    """(y, h | None, rstd) for the (rows, n) matrix x; rows wider than `max_one_pass` are looped over chunks of
    `block` (a power of two). Tests lower both to reach the looped kernel with small rows."""
    rows, n = x.shape
    y = _alloc.empty((rows, n), dtype=x.dtype, device=x.device)
    h = _alloc.empty((rows, n), dtype=x.dtype, device=x.device) if residual is not None else None
    rstd = _alloc.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        res = residual if residual is not None else x
        args = (x, x.stride(0), res, res.stride(0), weight, y, h if h is not None else y, rstd, n, eps)
        if n <= max_one_pass:
            width, warps = _settings(n)
            _rms_norm_fwd_kernel[(rows,)](*args, HAS_RESIDUAL=residual is not None, BLOCK_SIZE=width,
                                          num_warps=warps)
        else:
            _rms_norm_wide_fwd_kernel[(rows,)](*args, HAS_RESIDUAL=residual is not None, BLOCK_SIZE=block,
                                               num_warps=WIDE_WARPS)
    return y, h, rstd


def backward(dy, x, weight, rstd, dh, deterministic, *, max_one_pass: int = MAX_ONE_PASS_BWD,
             block: int = WIDE_BLOCK):
    """(dx, dw) for (rows, n) matrices; rows wider than `max_one_pass` take the two looped kernels."""
    rows, n = x.shape
    dx = _alloc.empty((rows, n), dtype=x.dtype, device=x.device)
    dw = _alloc.empty((n,), dtype=weight.dtype, device=x.device)
    programs = bands(rows, x.device)
    partial = _alloc.empty((programs if deterministic else 1, n), dtype=torch.float32, device=x.device)
    if not deterministic or not rows:
        partial.zero_()
    if rows:
        dh_arg = dh if dh is not None else dy
        flags = dict(HAS_DH=dh is not None, ATOMIC=not deterministic)
        rows_per_program = triton.cdiv(rows, programs)
        if n <= max_one_pass:
            width, warps = _settings(n)
            _rms_norm_bwd_kernel[(programs,)](
                dy, dy.stride(0), x, x.stride(0), weight, rstd, dh_arg, dh_arg.stride(0), dx, partial, rows, n,
                rows_per_program, **flags, BLOCK_SIZE=width, num_warps=warps)
        else:
            c = _alloc.empty((rows,), dtype=torch.float32, device=x.device)
            _rms_norm_row_dot_kernel[(rows,)](dy, dy.stride(0), x, x.stride(0), weight, rstd, c, n,
                                              BLOCK_SIZE=block, num_warps=WIDE_WARPS)
            _rms_norm_columns_bwd_kernel[(programs, triton.cdiv(n, block))](
                dy, dy.stride(0), x, x.stride(0), weight, rstd, c, dh_arg, dh_arg.stride(0), dx, partial, rows, n,
                rows_per_program, **flags, BLOCK_SIZE=block, num_warps=WIDE_WARPS)
    return dx, sum_partials(partial, dw)


def compile_variants() -> list:
    """Every launch the host wrappers can choose (one-pass: next_power_of_2(n) up to MAX_ONE_PASS_FWD forward and
    MAX_ONE_PASS_BWD backward; looped: WIDE_BLOCK at WIDE_WARPS), with and without the fused residual (forward)
    and dh / atomics (backward), per dtype, plus the partial-row sum (kernels/triton/_variants.py)."""
    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    for dtype in ("float32", "float16", "bfloat16"):
        forward = {"x_ptr": dtype, "res_ptr": dtype, "w_ptr": dtype, "y_ptr": dtype, "h_ptr": dtype,
                   "rstd_ptr": "float32"}
        backward = {"dy_ptr": dtype, "x_ptr": dtype, "w_ptr": dtype, "rstd_ptr": "float32", "dh_ptr": dtype,
                    "dx_ptr": dtype, "dw_partial_ptr": "float32", "c_ptr": "float32"}
        launches = [(_rms_norm_fwd_kernel, *_settings(1 << i)) for i in range(MAX_ONE_PASS_FWD.bit_length())]
        launches += [(_rms_norm_bwd_kernel, *_settings(1 << i)) for i in range(MAX_ONE_PASS_BWD.bit_length())]
        launches += [(kernel, WIDE_BLOCK, WIDE_WARPS) for kernel in (_rms_norm_wide_fwd_kernel,
                                                                     _rms_norm_row_dot_kernel,
                                                                     _rms_norm_columns_bwd_kernel)]
        for kernel, block, warps in launches:
            flags = [name for name in ("HAS_RESIDUAL", "HAS_DH", "ATOMIC") if name in kernel.arg_names]
            for values in product((False, True), repeat=len(flags)):
                constexprs = dict(zip(flags, values, strict=True)) | {"BLOCK_SIZE": block}
                pointers = {k: v for k, v in (forward if "eps" in kernel.arg_names else backward).items()
                            if k in kernel.arg_names}
                sig = signature(kernel, constexprs, pointers, floats=("eps",), generic=("n_rows", "rows_per_program"))
                label = f"{dtype} BLOCK_SIZE={block} " + " ".join(f"{k}={v}" for k, v in constexprs.items()
                                                                  if k != "BLOCK_SIZE")
                out.append(Variant("rms_norm", kernel, sig, constexprs, warps, 3, label.strip()))
    return out + sum_partials_variants("rms_norm")
