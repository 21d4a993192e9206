"""Triton cross-entropy rows for gf.fused_linear_cross_entropy: the loss of each token of a chunk of tokens'
logits, and, for a block of vocabulary columns of every token, the gradient of the logits written in place.

One program per token streams its row in BLOCK_SIZE chunks (only a chunk in registers, so a 128K or 256K
vocabulary costs no more registers than a small one), in fp32 whatever the logits' dtype. With z the
(optionally softcapped, z = cap·tanh(u/cap)) logits, t the target and ε the label smoothing:
- forward (whole rows): one pass keeps, per lane, a running max and a running Σ exp(z − max) (rescaled when
  the max grows, as the online softmax does) and Σ z; then lse = logsumexp(z) and
      loss = lse − (1 − ε)·z_t − (ε/V)·Σ z + z_loss·lse²      (0 where t = ignore_index);
- backward (columns col_start .. col_start + width of each row, lse known): one pass writes
      dz = g·(softmax(z)·(1 + 2·z_loss·lse) − ε/V − (1 − ε)·[j = t]),  times 1 − tanh² through the softcap,
  over the logits (the caller's block buffer), g the token's incoming gradient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc
from gpuforge.kernels.triton._host import interpreted


@triton.jit
def _tanh(x):
    """tanh without overflow (exp of −2|x| ≤ 1); libdevice's tanh has no interpreter counterpart."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _cross_entropy_fwd_kernel(
    logits_ptr,  # (rows, V) chunk of logits, last dim contiguous
    logits_row_stride,
    target_ptr,  # int64 (rows,)
    loss_ptr,  # fp32 (rows,) per-token loss
    lse_ptr,  # fp32 (rows,) logsumexp of the (capped) logits, for the backward
    n_cols,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    cols = tl.arange(0, BLOCK_SIZE)
    m = tl.full([BLOCK_SIZE], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_SIZE], tl.float32)
    z_sum = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        mask = offsets < n_cols
        z = tl.load(row_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z_sum += tl.where(mask, z, 0.0)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m, z)
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)  # lanes with nothing yet stay at s = 0
        s = s * tl.exp(m - shift) + tl.exp(z - shift)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    target = tl.load(target_ptr + row)
    valid = target != ignore_index
    z_t = tl.load(row_ptr + tl.where(valid, target, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        z_t = softcap * _tanh(z_t / softcap)
    loss = lse - (1.0 - label_smoothing) * z_t - label_smoothing * (tl.sum(z_sum, axis=0) / n_cols) \
        + z_loss * lse * lse
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _cross_entropy_bwd_kernel(
    logits_ptr,  # (rows, width) block of logits (vocabulary columns col_start ..), overwritten with their gradient
    logits_row_stride,
    target_ptr,  # int64 (rows,)
    lse_ptr,  # fp32 (rows,) from the forward
    grad_ptr,  # fp32 (rows,) incoming gradient of each token's loss
    n_cols,  # the block's width
    col_start,  # the block's first vocabulary column
    vocab,  # V, for the smoothing term ε/V
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * logits_row_stride
    cols = tl.arange(0, BLOCK_SIZE)
    target = tl.load(target_ptr + row)
    lse = tl.load(lse_ptr + row)
    # an ignored token gets exactly zero, whatever its incoming gradient (inf for a mean over no tokens)
    g = tl.where(target != ignore_index, tl.load(grad_ptr + row), 0.0)
    p_scale = 1.0 + 2.0 * z_loss * lse
    smooth = label_smoothing / vocab
    target_col = target - col_start
    for start in range(0, n_cols, BLOCK_SIZE):
        offsets = start + cols
        mask = offsets < n_cols
        z = tl.load(row_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            capped = _tanh(z / softcap)
            z = softcap * capped
        dz = tl.exp(z - lse) * p_scale - smooth - tl.where(offsets == target_col, 1.0 - label_smoothing, 0.0)
        dz = dz * g
        if HAS_SOFTCAP:
            dz = dz * (1.0 - capped * capped)
        tl.store(row_ptr + offsets, dz.to(logits_ptr.dtype.element_ty), mask=mask)


# 4096 fp32 lanes over 8 warps (16 per thread) keep enough loads in flight for a bandwidth-bound row.
BLOCK = 4096


def _launch_settings(n_cols: int) -> dict:
    block = min(BLOCK, triton.next_power_of_2(n_cols))
    return dict(BLOCK_SIZE=block, num_warps=1 if interpreted() else min(max(block // 512, 1), 8))


def forward(logits, target, ignore_index, label_smoothing, z_loss, softcap):
    rows, n_cols = logits.shape
    loss = _alloc.empty((rows,), dtype=torch.float32, device=logits.device)
    lse = _alloc.empty((rows,), dtype=torch.float32, device=logits.device)
    if rows:
        _cross_entropy_fwd_kernel[(rows,)](
            logits, logits.stride(0), target, loss, lse, n_cols, ignore_index, label_smoothing, z_loss,
            softcap or 1.0, HAS_SOFTCAP=softcap is not None, **_launch_settings(n_cols))
    return loss, lse


def backward(logits, target, lse, grad, col_start, vocab, ignore_index, label_smoothing, z_loss, softcap):
    rows, n_cols = logits.shape
    if rows and n_cols:
        _cross_entropy_bwd_kernel[(rows,)](
            logits, logits.stride(0), target, lse, grad, n_cols, col_start, vocab, ignore_index, label_smoothing,
            z_loss, softcap or 1.0, HAS_SOFTCAP=softcap is not None, **_launch_settings(n_cols))
    return logits


def compile_variants() -> list:
    """Every block the host wrappers can choose (min(BLOCK, next_power_of_2(V))), with and without softcapping,
    forward and backward, per logits dtype (kernels/triton/_variants.py). Vocabulary sizes, block offsets and
    ignore_index are not assumed divisible by 16."""
    from itertools import product

    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    for dtype, block, softcap in product(("float32", "float16", "bfloat16"),
                                         (1 << i for i in range(BLOCK.bit_length())), (False, True)):
        constexprs = {"HAS_SOFTCAP": softcap, "BLOCK_SIZE": block}
        warps = _launch_settings(block)["num_warps"]
        for kernel in (_cross_entropy_fwd_kernel, _cross_entropy_bwd_kernel):
            pointers = {name: ("int64" if name == "target_ptr" else dtype if name == "logits_ptr" else "float32")
                        for name in kernel.arg_names if name.endswith("_ptr")}
            sig = signature(kernel, constexprs, pointers, generic=("n_cols", "col_start", "vocab", "ignore_index"),
                            floats=("label_smoothing", "z_loss", "softcap"))
            out.append(Variant("fused_linear_cross_entropy", kernel, sig, constexprs, warps, 3,
                               f"{dtype} BLOCK_SIZE={block} softcap={softcap}"))
    return out
