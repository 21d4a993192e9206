"""Triton softmax over the last dim of a (rows, n) matrix: forward y = exp(x − max) / Σ exp(x − max) and the
fused backward dx = y ⊙ (dy − Σ dy⊙y), one program per row, fp32 arithmetic, one rounding on store.

Choice by width (`gpuforge inspect` checks every launch below for spills on sm_80 and sm_90):
- forward: rows up to MAX_ONE_PASS_FWD = 32K elements stay in registers (32 fp32 values per thread at 32
  warps): each element is read once and written once, the minimum traffic. Wider rows take the online
  (looped) kernel: a first pass over BLOCK-sized column chunks keeps a running max and a running sum of
  exponentials per lane (rescaling the sum whenever the max grows), a second pass writes the outputs, so the
  row is read twice and written once. A one-pass 64K row would need 64 values per thread where 1024 threads
  may hold at most 64 registers: it spills.
- backward: rows up to MAX_ONE_PASS_BWD = 16K stay in registers (dy and y read once, dx written once); at
  32K the one-pass kernel spilled 40-56 B per thread (dy and y, 64 values per thread at 32 warps), so wider
  rows take the looped kernel: Σ dy⊙y over the chunks, then dx chunk by chunk (dy and y read twice each).
A fully masked row (all −inf) gives NaN, as torch.softmax does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc
from gpuforge.kernels.triton._host import interpreted


@triton.jit
def _softmax_fwd_kernel(
    x_ptr,  # input rows, last dim contiguous
    x_row_stride,
    y_ptr,  # output rows, contiguous
    n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row, the whole row in registers: max, exp, sum and scale without touching memory again.
    Lanes past n_cols load −inf, so they add exp(−inf) = 0 to the sum."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=-float("inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_online_fwd_kernel(
    x_ptr,  # input rows, last dim contiguous
    x_row_stride,
    y_ptr,  # output rows, contiguous
    n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row, the row streamed in BLOCK_SIZE chunks. Pass 1 keeps, per lane, a running max m and
    a running sum s of exp(x − m) (s is rescaled by exp(m_old − m_new) when the max grows), then reduces the
    lanes once; pass 2 reads the row again and writes exp(x − m) / s. A max still at −inf is shifted by 0
    instead, so empty lanes stay at s = 0 rather than turning NaN; the final division keeps the NaN of a fully
    masked row, as torch.softmax does."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * x_row_stride
    cols = tl.arange(0, BLOCK_SIZE)
    m = tl.full([BLOCK_SIZE], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        x = tl.load(x_row + offsets, mask=offsets < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, x)
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.exp(x - shift)
        m = m_new
    m_row = tl.max(m, axis=0)
    shift = tl.where(m_row == -float("inf"), 0.0, m_row)
    s_row = tl.sum(s * tl.exp(m - shift), axis=0)
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        mask = offsets < n_cols
        x = tl.load(x_row + offsets, mask=mask, other=-float("inf")).to(tl.float32)
        y = tl.exp(x - m_row) / s_row
        tl.store(y_ptr + row * n_cols + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_bwd_kernel(
    dy_ptr,  # upstream gradient rows, last dim contiguous
    dy_row_stride,
    y_ptr,  # forward outputs, contiguous
    dx_ptr,  # input gradient rows, contiguous
    n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row, dy and y held in registers: the dot Σ dy⊙y and dx = y ⊙ (dy − dot) in one pass."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    dy = tl.load(dy_ptr + row * dy_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    dx = y * (dy - tl.sum(dy * y, axis=0))
    tl.store(dx_ptr + row * n_cols + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _softmax_online_bwd_kernel(
    dy_ptr,  # upstream gradient rows, last dim contiguous
    dy_row_stride,
    y_ptr,  # forward outputs, contiguous
    dx_ptr,  # input gradient rows, contiguous
    n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    """One program per row, streamed in BLOCK_SIZE chunks: pass 1 accumulates Σ dy⊙y per lane in fp32,
    pass 2 re-reads dy and y and writes dx = y ⊙ (dy − dot)."""
    row = tl.program_id(0).to(tl.int64)
    dy_row = dy_ptr + row * dy_row_stride
    y_row = y_ptr + row * n_cols
    cols = tl.arange(0, BLOCK_SIZE)
    acc = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        mask = offsets < n_cols
        dy = tl.load(dy_row + offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_row + offsets, mask=mask, other=0.0).to(tl.float32)
        acc += dy * y
    dot = tl.sum(acc, axis=0)
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        mask = offsets < n_cols
        dy = tl.load(dy_row + offsets, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_row + offsets, mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + row * n_cols + offsets, (y * (dy - dot)).to(dx_ptr.dtype.element_ty), mask=mask)


# Widest rows the one-pass kernels keep in registers without spilling on sm_80/sm_90 (module docstring).
MAX_ONE_PASS_FWD = 32768
MAX_ONE_PASS_BWD = 16384
# Chunk of the online kernels: 4096 lanes over 8 warps (16 per thread) keep enough bytes in flight; at 16
# warps the fp32 backward spilled 8 B per thread on sm_80.
ONLINE_BLOCK = 4096
ONLINE_WARPS = 8


def _num_warps(block: int) -> int:
    """Warps per program: about 8 elements per thread up to 1024 threads (the interpreter ignores it)."""
    if interpreted():
        return 1
    return max(1, min(32, block // 256))


def _launch(one_pass, online, out: torch.Tensor, args: tuple, n: int, max_one_pass: int,
            online_block: int) -> None:
    rows = out.numel() // n
    if n <= max_one_pass:
        block = triton.next_power_of_2(n)
        one_pass[(rows,)](*args, n, BLOCK_SIZE=block, num_warps=_num_warps(block))
    else:
        online[(rows,)](*args, n, BLOCK_SIZE=online_block, num_warps=1 if interpreted() else ONLINE_WARPS)


def forward(x: torch.Tensor, *, max_one_pass: int = MAX_ONE_PASS_FWD,
            online_block: int = ONLINE_BLOCK) -> torch.Tensor:
    """Softmax over the last dim of the (rows, n) matrix x; rows longer than `max_one_pass` take the online
    kernel with chunks of `online_block` (a power of two). Tests lower both to exercise the online path cheaply."""
    y = _alloc.empty_like(x)
    _launch(_softmax_fwd_kernel, _softmax_online_fwd_kernel, y, (x, x.stride(0), y), x.shape[-1],
            max_one_pass, online_block)
    return y


def backward(dy: torch.Tensor, y: torch.Tensor, *, max_one_pass: int = MAX_ONE_PASS_BWD,
             online_block: int = ONLINE_BLOCK) -> torch.Tensor:
    """dx = y ⊙ (dy − Σ dy⊙y) over the last dim of (rows, n) matrices; y contiguous (as the forward returns it);
    rows longer than `max_one_pass` take the looped kernel."""
    dx = _alloc.empty_like(y)
    _launch(_softmax_bwd_kernel, _softmax_online_bwd_kernel, dx, (dy, dy.stride(0), y, dx), y.shape[-1],
            max_one_pass, online_block)
    return dx


def compile_variants() -> list:
    """Every block the host wrappers can choose (one-pass: next_power_of_2(n) up to MAX_ONE_PASS_FWD forward and
    MAX_ONE_PASS_BWD backward; online: ONLINE_BLOCK at ONLINE_WARPS), per dtype, with the GPU's warp count
    (kernels/triton/_variants.py)."""
    from gpuforge.kernels.triton._variants import Variant, signature

    def warps(block):
        return max(1, min(32, block // 256))

    out = []
    for dtype in ("float32", "float16", "bfloat16"):
        forward = {"x_ptr": dtype, "y_ptr": dtype}
        backward = {"dy_ptr": dtype, "y_ptr": dtype, "dx_ptr": dtype}
        launches = [(_softmax_fwd_kernel, forward, b, warps(b)) for b in (1 << i for i in range(16))
                    if b <= MAX_ONE_PASS_FWD]
        launches += [(_softmax_bwd_kernel, backward, b, warps(b)) for b in (1 << i for i in range(16))
                     if b <= MAX_ONE_PASS_BWD]
        launches += [(k, p, ONLINE_BLOCK, ONLINE_WARPS) for k, p in ((_softmax_online_fwd_kernel, forward),
                                                                     (_softmax_online_bwd_kernel, backward))]
        for kernel, pointers, block, num_warps in launches:
            constexprs = {"BLOCK_SIZE": block}
            out.append(Variant("softmax", kernel, signature(kernel, constexprs, pointers), constexprs, num_warps,
                               3, f"{dtype} BLOCK_SIZE={block}"))
    return out
