"""Triton LayerNorm: y = (x − mean)·rstd·w + b over the last dim of a (rows, n) matrix, with an optional fused
residual add (h = x + r is normalised and returned), and the backward for x, weight and bias.

Statistics are fp32 whatever the input dtype; the forward saves mean and rstd = 1/sqrt(var + eps) per row.
Choice by width (`gpuforge inspect` checks every launch below for spills on sm_80 and sm_90):
- forward: rows up to MAX_ONE_PASS_FWD = 16K elements are held whole in registers: x read once (mean, then
  the variance of the centred row, both in registers), y written once. At 32K the fp32 one-pass kernel spilled
  88-96 B per thread (x, the centred row, w and b at the 16-warp cap). Wider rows, of any width, are streamed
  in `block`-sized chunks (WIDE_BLOCK): a running (count, mean, M2) per lane (Welford) in a first pass, the
  lanes merged, y written in a second pass: x read twice.
- backward: rows up to MAX_ONE_PASS_BWD = 8K are held whole (dy and x read once per row; at 16K the one-pass
  kernel spilled 0.4-1.3 KB, holding dy, x, w and two partial rows). Wider rows take two kernels: each row's
  two dots (mean of g = dy·w and of g·x̂) in a first, then, on a (band of rows × block of columns) grid, dx
  and the band's partial dw/db columns in a second: dy and x read twice.
The weight and bias gradients are one fp32 partial row per band, summed in a fixed order (deterministic,
kernels/triton/_partials.py), or added into one fp32 row with atomics (deterministic=False).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc
from gpuforge.kernels.triton._host import interpreted
from gpuforge.kernels.triton._partials import bands, sum_partials, sum_partials_variants


@triton.jit
def _load_row(x_ptr, x_row_stride, res_ptr, res_row_stride, row, offsets, mask, h_dtype,
              HAS_RESIDUAL: tl.constexpr):
    """The row to normalise at `offsets`: x, or h = x + residual rounded to the stream dtype (the h the op
    returns and the backward reuses)."""
    x = tl.load(x_ptr + row * x_row_stride + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_row_stride + offsets, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(h_dtype)
    return x


@triton.jit
def _affine(xhat, w_ptr, b_ptr, offsets, mask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    y = xhat
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,  # input rows, last dim contiguous
    x_row_stride,
    res_ptr,  # residual rows (read only when HAS_RESIDUAL)
    res_row_stride,
    w_ptr,  # weight (n,) (read only when HAS_WEIGHT)
    b_ptr,  # bias (n,) (read only when HAS_BIAS)
    y_ptr,  # output rows, contiguous
    h_ptr,  # x + residual, contiguous (written only when HAS_RESIDUAL)
    mean_ptr,  # fp32 (rows,), saved for the backward
    rstd_ptr,  # fp32 (rows,)
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row, the whole row in registers: mean, variance of the centred row, scale, store."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = _load_row(x_ptr, x_row_stride, res_ptr, res_row_stride, row, cols, mask, h_ptr.dtype.element_ty,
                  HAS_RESIDUAL)
    if HAS_RESIDUAL:
        tl.store(h_ptr + row * n_cols + cols, x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centred = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    y = _affine(centred * rstd, w_ptr, b_ptr, cols, mask, HAS_WEIGHT, HAS_BIAS)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_wide_fwd_kernel(
    x_ptr, x_row_stride, res_ptr, res_row_stride, w_ptr, b_ptr, y_ptr, h_ptr, mean_ptr, rstd_ptr,  # as above
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row, streamed in BLOCK_SIZE chunks (only a chunk in registers). Pass 1: each lane keeps
    Welford's running count, mean and M2 = Σ(x − mean)² over the chunks (no cancellation, unlike Σx² − n·mean²);
    the lanes are merged once (Chan's formula). Pass 2 reads the row again (h is recomputed from x and the
    residual with the same rounding, not read back) and writes y."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    count = tl.zeros([BLOCK_SIZE], tl.float32)
    lane_mean = tl.zeros([BLOCK_SIZE], tl.float32)
    lane_m2 = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        mask = offsets < n_cols
        x = _load_row(x_ptr, x_row_stride, res_ptr, res_row_stride, row, offsets, mask, h_ptr.dtype.element_ty,
                      HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(h_ptr + row * n_cols + offsets, x, mask=mask)
        x = x.to(tl.float32)
        count = tl.where(mask, count + 1.0, count)
        delta = x - lane_mean
        lane_mean = tl.where(mask, lane_mean + delta / tl.maximum(count, 1.0), lane_mean)
        lane_m2 = tl.where(mask, lane_m2 + delta * (x - lane_mean), lane_m2)
    mean = tl.sum(count * lane_mean, axis=0) / n_cols
    spread = lane_mean - mean
    var = (tl.sum(lane_m2, axis=0) + tl.sum(count * spread * spread, axis=0)) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        mask = offsets < n_cols
        x = _load_row(x_ptr, x_row_stride, res_ptr, res_row_stride, row, offsets, mask, h_ptr.dtype.element_ty,
                      HAS_RESIDUAL).to(tl.float32)
        y = _affine((x - mean) * rstd, w_ptr, b_ptr, offsets, mask, HAS_WEIGHT, HAS_BIAS)
        tl.store(y_ptr + row * n_cols + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr,  # upstream gradient rows, last dim contiguous
    dy_row_stride,
    x_ptr,  # the normalised rows (h for the fused residual form)
    x_row_stride,
    w_ptr,  # weight (n,) (read only when HAS_WEIGHT)
    mean_ptr,  # fp32 (rows,) from the forward
    rstd_ptr,  # fp32 (rows,)
    dh_ptr,  # gradient arriving at h, added to dx (read only when HAS_DH)
    dh_row_stride,
    dx_ptr,  # output rows, contiguous
    dw_partial_ptr,  # fp32 (bands, n) partial Σ dy·x̂, or (1, n) zeroed for the atomic form
    db_partial_ptr,  # fp32 (bands, n) partial Σ dy, likewise
    n_rows,
    n_cols,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_DH: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """A band of rows per program, each row whole in registers: dx = rstd·(g − mean(g) − x̂·mean(g·x̂)) with
    g = dy·w; the band's Σ dy·x̂ and Σ dy accumulate in fp32 registers and are stored once."""
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    db = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w
        dx = rstd * (g - tl.sum(g, axis=0) / n_cols - xhat * (tl.sum(g * xhat, axis=0) / n_cols))
        if HAS_DH:
            dx += tl.load(dh_ptr + row * dh_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    if ATOMIC:
        tl.atomic_add(dw_partial_ptr + cols, dw, mask=mask)
        tl.atomic_add(db_partial_ptr + cols, db, mask=mask)
    else:
        tl.store(dw_partial_ptr + pid * n_cols + cols, dw, mask=mask)
        tl.store(db_partial_ptr + pid * n_cols + cols, db, mask=mask)


@triton.jit
def _layer_norm_row_dots_kernel(
    dy_ptr, dy_row_stride, x_ptr, x_row_stride, w_ptr, mean_ptr, rstd_ptr,  # as in _layer_norm_bwd_kernel
    c1_ptr,  # fp32 (rows,): mean(g) of each row
    c2_ptr,  # fp32 (rows,): mean(g·x̂)
    n_cols,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Wide rows, first backward pass: one program per row streams dy and x in chunks and keeps per-lane fp32
    sums of g and g·x̂, reduced once at the end."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mean = tl.load(mean_ptr + row)
    rstd = tl.load(rstd_ptr + row)
    sum_g = tl.zeros([BLOCK_SIZE], tl.float32)
    sum_gx = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        mask = offsets < n_cols
        g = tl.load(dy_ptr + row * dy_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g = g * tl.load(w_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_row_stride + offsets, mask=mask, other=0.0).to(tl.float32)
        sum_g += g
        sum_gx += g * tl.where(mask, (x - mean) * rstd, 0.0)
    tl.store(c1_ptr + row, tl.sum(sum_g, axis=0) / n_cols)
    tl.store(c2_ptr + row, tl.sum(sum_gx, axis=0) / n_cols)


@triton.jit
def _layer_norm_columns_bwd_kernel(
    dy_ptr, dy_row_stride, x_ptr, x_row_stride, w_ptr, mean_ptr, rstd_ptr,  # as in _layer_norm_bwd_kernel
    c1_ptr,  # fp32 (rows,) from _layer_norm_row_dots_kernel
    c2_ptr,
    dh_ptr, dh_row_stride, dx_ptr, dw_partial_ptr, db_partial_ptr,  # as in _layer_norm_bwd_kernel
    n_rows,
    n_cols,
    rows_per_program,
    HAS_WEIGHT: tl.constexpr,
    HAS_DH: tl.constexpr,
    ATOMIC: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    """Wide rows, second backward pass: program (band, column block) writes dx for its columns of its rows and
    keeps the band's Σ dy·x̂ and Σ dy for those columns in fp32 registers, stored once."""
    band = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    if HAS_WEIGHT:
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    db = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = band * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for row in range(row_start, row_end):
        dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        xhat = tl.where(mask, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
        g = dy
        if HAS_WEIGHT:
            g = dy * w
        dx = rstd * (g - tl.load(c1_ptr + row) - xhat * tl.load(c2_ptr + row))
        if HAS_DH:
            dx += tl.load(dh_ptr + row * dh_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    if ATOMIC:
        tl.atomic_add(dw_partial_ptr + cols, dw, mask=mask)
        tl.atomic_add(db_partial_ptr + cols, db, mask=mask)
    else:
        tl.store(dw_partial_ptr + band * n_cols + cols, dw, mask=mask)
        tl.store(db_partial_ptr + band * n_cols + cols, db, mask=mask)


# Widest rows the one-pass kernels hold in registers without spilling on sm_80/sm_90 (module docstring);
# wider rows are streamed in 4K chunks.
MAX_ONE_PASS_FWD = 16384
MAX_ONE_PASS_BWD = 8192
WIDE_BLOCK = 4096


def _num_warps(block: int) -> int:
    """About 8-16 elements per thread, up to 16 warps (the interpreter ignores it)."""
    return 1 if interpreted() else min(max(block // 256, 1), 16)


def forward(x, weight, bias, residual, eps, *, max_one_pass: int = MAX_ONE_PASS_FWD, block: int = WIDE_BLOCK):
    """(y, h | None, mean, rstd) for the (rows, n) matrix x; rows wider than `max_one_pass` are streamed in
    chunks of `block` (a power of two). Tests lower both to reach the wide kernels with small rows."""
    rows, n = x.shape
    y = _alloc.empty((rows, n), dtype=x.dtype, device=x.device)
    h = _alloc.empty((rows, n), dtype=x.dtype, device=x.device) if residual is not None else None
    mean = _alloc.empty((rows,), dtype=torch.float32, device=x.device)
    rstd = _alloc.empty((rows,), dtype=torch.float32, device=x.device)
    if rows:
        res = residual if residual is not None else x
        one_pass = n <= max_one_pass
        kernel = _layer_norm_fwd_kernel if one_pass else _layer_norm_wide_fwd_kernel
        width = triton.next_power_of_2(n) if one_pass else block
        kernel[(rows,)](
            x, x.stride(0), res, res.stride(0), weight if weight is not None else x, bias if bias is not None else x,
            y, h if h is not None else y, mean, rstd, n, eps, HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_SIZE=width, num_warps=_num_warps(width))
    return y, h, mean, rstd


def backward(dy, x, weight, mean, rstd, dh, deterministic, *, max_one_pass: int = MAX_ONE_PASS_BWD,
             block: int = WIDE_BLOCK):
    """(dx, dw, db) for (rows, n) matrices; dw = Σ dy·x̂ and db = Σ dy are returned even without a weight or
    bias (the face drops them), in x's dtype."""
    rows, n = x.shape
    dx = _alloc.empty((rows, n), dtype=x.dtype, device=x.device)
    dw = _alloc.empty((n,), dtype=x.dtype, device=x.device)
    db = _alloc.empty((n,), dtype=x.dtype, device=x.device)
    programs = bands(rows, x.device)
    shape = (programs if deterministic else 1, n)
    dw_partial = _alloc.empty(shape, dtype=torch.float32, device=x.device)
    db_partial = _alloc.empty(shape, dtype=torch.float32, device=x.device)
    if not deterministic or not rows:
        dw_partial.zero_()
        db_partial.zero_()
    if rows:
        w_arg = weight if weight is not None else x
        dh_arg = dh if dh is not None else dy
        common = dict(HAS_WEIGHT=weight is not None, HAS_DH=dh is not None, ATOMIC=not deterministic)
        rows_per_program = triton.cdiv(rows, programs)
        if n <= max_one_pass:
            width = triton.next_power_of_2(n)
            _layer_norm_bwd_kernel[(programs,)](
                dy, dy.stride(0), x, x.stride(0), w_arg, mean, rstd, dh_arg, dh_arg.stride(0), dx, dw_partial,
                db_partial, rows, n, rows_per_program, **common, BLOCK_SIZE=width, num_warps=_num_warps(width))
        else:
            c1 = _alloc.empty((rows,), dtype=torch.float32, device=x.device)
            c2 = _alloc.empty((rows,), dtype=torch.float32, device=x.device)
            _layer_norm_row_dots_kernel[(rows,)](
                dy, dy.stride(0), x, x.stride(0), w_arg, mean, rstd, c1, c2, n, HAS_WEIGHT=weight is not None,
                BLOCK_SIZE=block, num_warps=_num_warps(block))
            _layer_norm_columns_bwd_kernel[(programs, triton.cdiv(n, block))](
                dy, dy.stride(0), x, x.stride(0), w_arg, mean, rstd, c1, c2, dh_arg, dh_arg.stride(0), dx,
                dw_partial, db_partial, rows, n, rows_per_program, **common, BLOCK_SIZE=block,
                num_warps=_num_warps(block))
    return dx, sum_partials(dw_partial, dw), sum_partials(db_partial, db)


def compile_variants() -> list:
    """Every block the host wrappers can choose (one-pass: next_power_of_2(n) up to MAX_ONE_PASS_FWD forward and
    MAX_ONE_PASS_BWD backward; streamed:
    WIDE_BLOCK), with every combination of residual / weight / bias (forward) and weight / dh / atomics
    (backward), per dtype, plus the partial-row sum (kernels/triton/_variants.py)."""
    from itertools import product

    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    for dtype in ("float32", "float16", "bfloat16"):
        forward = {"x_ptr": dtype, "res_ptr": dtype, "w_ptr": dtype, "b_ptr": dtype, "y_ptr": dtype, "h_ptr": dtype,
                   "mean_ptr": "float32", "rstd_ptr": "float32"}
        backward = {"dy_ptr": dtype, "x_ptr": dtype, "w_ptr": dtype, "mean_ptr": "float32", "rstd_ptr": "float32",
                    "dh_ptr": dtype, "dx_ptr": dtype, "dw_partial_ptr": "float32", "db_partial_ptr": "float32",
                    "c1_ptr": "float32", "c2_ptr": "float32"}
        launches = [(_layer_norm_fwd_kernel, 1 << i) for i in range(MAX_ONE_PASS_FWD.bit_length())]
        launches += [(_layer_norm_bwd_kernel, 1 << i) for i in range(MAX_ONE_PASS_BWD.bit_length())]
        launches += [(kernel, WIDE_BLOCK) for kernel in (_layer_norm_wide_fwd_kernel, _layer_norm_row_dots_kernel,
                                                         _layer_norm_columns_bwd_kernel)]
        for kernel, block in launches:
            flags = [name for name in ("HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS", "HAS_DH", "ATOMIC")
                     if name in kernel.arg_names]
            for values in product((False, True), repeat=len(flags)):
                constexprs = dict(zip(flags, values, strict=True)) | {"BLOCK_SIZE": block}
                pointers = {k: v for k, v in (forward if "eps" in kernel.arg_names else backward).items()
                            if k in kernel.arg_names}
                sig = signature(kernel, constexprs, pointers, floats=("eps",), generic=("n_rows", "rows_per_program"))
                label = f"{dtype} BLOCK_SIZE={block} " + " ".join(f"{k}={v}" for k, v in constexprs.items()
                                                                  if k != "BLOCK_SIZE")
                out.append(Variant("layer_norm", kernel, sig, constexprs, _num_warps(block), 3, label.strip()))
    return out + sum_partials_variants("layer_norm")
