"""Triton RoPE: q and k rotated in one launch, forward and backward (the transposed rotation).

One program per (batch, position) token: it loads that token's cos/sin row once (fp32 registers) and rotates
every query head and then every key head, a tile of BLOCK_H heads × the R/2 pairs at a time, then copies the
D − R pass-through dims of each head. Pair i is (i, i + R/2) in the rotate-half layout and (2i, 2i + 1) in the
interleaved one; with c/s the table entries at the pair's first (1) and second (2) index, the forward writes
    o₁ = x₁·c₁ − x₂·s₁,   o₂ = x₂·c₂ + x₁·s₂                       (HF's q·cos + rotate_half(q)·sin)
and the backward, the transpose of that linear map (a rotation by −angle when the entries of a pair agree),
    d₁ = g₁·c₁ + g₂·s₂,   d₂ = g₂·c₂ − g₁·s₁.
Arithmetic is fp32, one rounding on store; inputs are read through their strides (last dim contiguous), outputs
are contiguous (B, H, S, D).
"""

from __future__ import annotations

import triton
import triton.language as tl

from gpuforge.kernels import _alloc
from gpuforge.kernels.triton._host import interpreted


@triton.jit
def _rotate_heads(
    in_ptr, in_stride_b, in_stride_h, in_stride_s,  # one input tensor (B, H, S, D), last dim contiguous
    out_ptr,  # its contiguous output
    n_heads, seq_len, head_dim, rot_dim,
    b, s,  # this program's token
    first, second, pair_mask,  # (BLOCK_HALF,) index of each pair's two entries, and which pairs exist
    c1, c2, a, bc,  # (BLOCK_HALF,) fp32: o₁ = x₁·c1 + x₂·a, o₂ = x₂·c2 + x₁·bc
    BLOCK_H: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    pass_cols = tl.arange(0, BLOCK_PASS)
    in_base = in_ptr + b * in_stride_b + s * in_stride_s
    out_base = out_ptr + (b * n_heads * seq_len + s) * head_dim
    for h0 in range(0, n_heads, BLOCK_H):
        h = h0 + heads
        h_mask = h < n_heads
        mask = h_mask[:, None] & pair_mask[None, :]
        in_row = in_base + h[:, None].to(tl.int64) * in_stride_h
        out_row = out_base + h[:, None].to(tl.int64) * seq_len * head_dim
        x1 = tl.load(in_row + first[None, :], mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(in_row + second[None, :], mask=mask, other=0.0).to(tl.float32)
        o1 = x1 * c1[None, :] + x2 * a[None, :]
        o2 = x2 * c2[None, :] + x1 * bc[None, :]
        tl.store(out_row + first[None, :], o1.to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(out_row + second[None, :], o2.to(out_ptr.dtype.element_ty), mask=mask)
        for start in range(rot_dim, head_dim, BLOCK_PASS):  # partial rotary: the rest passes through
            cols = start + pass_cols
            pass_mask = h_mask[:, None] & (cols < head_dim)[None, :]
            tl.store(out_row + cols[None, :], tl.load(in_row + cols[None, :], mask=pass_mask), mask=pass_mask)


@triton.jit
def _rope_kernel(
    q_ptr, q_stride_b, q_stride_h, q_stride_s,  # q (B, Hq, S, D), last dim contiguous
    k_ptr, k_stride_b, k_stride_h, k_stride_s,  # k (B, Hkv, S, D)
    q_out_ptr,  # contiguous (B, Hq, S, D)
    k_out_ptr,  # contiguous (B, Hkv, S, D)
    cos_ptr, sin_ptr,  # (B or 1, S, R) tables, last dim contiguous
    table_stride_b,  # 0 when one table serves every batch row
    table_stride_s,
    n_q_heads, n_k_heads, seq_len, head_dim, rot_dim,
    INTERLEAVED: tl.constexpr,
    BACKWARD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # ≥ R / 2
    BLOCK_PASS: tl.constexpr,
):
    """One token per program: its cos/sin row in registers, then q's heads and k's heads (see module doc)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    pairs = tl.arange(0, BLOCK_HALF)
    pair_mask = pairs < rot_dim // 2
    if INTERLEAVED:
        first = 2 * pairs
        second = first + 1
    else:
        first = pairs
        second = pairs + rot_dim // 2
    table = b * table_stride_b + s * table_stride_s
    c1 = tl.load(cos_ptr + table + first, mask=pair_mask, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + table + second, mask=pair_mask, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + table + first, mask=pair_mask, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + table + second, mask=pair_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        a = s2
        bc = -s1
    else:
        a = -s1
        bc = s2
    _rotate_heads(q_ptr, q_stride_b, q_stride_h, q_stride_s, q_out_ptr, n_q_heads, seq_len, head_dim, rot_dim,
                  b, s, first, second, pair_mask, c1, c2, a, bc, BLOCK_H, BLOCK_PASS)
    _rotate_heads(k_ptr, k_stride_b, k_stride_h, k_stride_s, k_out_ptr, n_k_heads, seq_len, head_dim, rot_dim,
                  b, s, first, second, pair_mask, c1, c2, a, bc, BLOCK_H, BLOCK_PASS)


# A tile of at most 16 heads × R/2 pairs (two loads of ≤ 2K fp32 values at R = 256) keeps registers in bounds.
MAX_BLOCK_H = 16
PASS_BLOCK = 64


def _rotate(q, k, cos, sin, interleaved: bool, backward: bool):
    batch, n_q, seq, head_dim = q.shape
    n_k = k.shape[1]
    rot_dim = cos.shape[-1]
    q_out = _alloc.empty((batch, n_q, seq, head_dim), dtype=q.dtype, device=q.device)
    k_out = _alloc.empty((batch, n_k, seq, head_dim), dtype=k.dtype, device=k.device)
    if q_out.numel() + k_out.numel() == 0:
        return q_out, k_out
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    cos3, sin3 = (t.reshape(t.shape[0] if t.dim() == 3 else 1, seq, rot_dim) for t in (cos, sin))
    cos3, sin3 = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos3, sin3))
    if sin3.stride() != cos3.stride():
        cos3, sin3 = cos3.contiguous(), sin3.contiguous()
    block_h = min(triton.next_power_of_2(max(n_q, n_k, 1)), MAX_BLOCK_H)
    _rope_kernel[(batch * seq,)](
        q, q.stride(0), q.stride(1), q.stride(2), k, k.stride(0), k.stride(1), k.stride(2), q_out, k_out,
        cos3, sin3, cos3.stride(0) if cos3.shape[0] > 1 else 0, cos3.stride(1), n_q, n_k, seq, head_dim, rot_dim,
        INTERLEAVED=interleaved, BACKWARD=backward, BLOCK_H=block_h,
        BLOCK_HALF=triton.next_power_of_2(max(rot_dim // 2, 1)), BLOCK_PASS=PASS_BLOCK,
        num_warps=1 if interpreted() else 4)
    return q_out, k_out


def forward(q, k, cos, sin, interleaved):
    return _rotate(q, k, cos, sin, interleaved, backward=False)


def backward(dq, dk, cos, sin, interleaved):
    return _rotate(dq, dk, cos, sin, interleaved, backward=True)


def compile_variants() -> list:
    """Head tiles of 1..MAX_BLOCK_H heads, pair blocks of head dims 32..256 (R/2 = 16..128), both layouts, forward
    and backward, per dtype (kernels/triton/_variants.py). Head counts and the table's batch stride (0 for a
    shared table) are not assumed divisible by 16."""
    from itertools import product

    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    blocks_h = [1 << i for i in range(MAX_BLOCK_H.bit_length())]
    for dtype, block_h, half, interleaved, backward in product(("float32", "float16", "bfloat16"), blocks_h,
                                                              (16, 32, 64, 128), (False, True), (False, True)):
        constexprs = {"INTERLEAVED": interleaved, "BACKWARD": backward, "BLOCK_H": block_h, "BLOCK_HALF": half,
                      "BLOCK_PASS": PASS_BLOCK}
        pointers = {name: dtype for name in _rope_kernel.arg_names if name.endswith("_ptr")}
        sig = signature(_rope_kernel, constexprs, pointers, generic=("table_stride_b", "n_q_heads", "n_k_heads"))
        out.append(Variant("rope", _rope_kernel, sig, constexprs, 4, 3,
                           f"{dtype} BLOCK_H={block_h} BLOCK_HALF={half} interleaved={interleaved} "
                           f"backward={backward}"))
    return out
