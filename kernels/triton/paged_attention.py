"""Decode attention on a paged KV cache in Triton, split along the KV length (flash-decoding).

Pass 1: one program per (sequence, KV head, split of the context): the query rows of every query head of the
GQA group, and of every one of the Sq new tokens, form one tile (so each K/V token is read once per group and
step, not once per query head or token; new token i sees the first seq_len − (Sq − 1 − i) tokens); tokens are
gathered through the block table (token t lives in page block_table[b, t // block_size], row t % block_size);
online softmax over the split; the normalised partial output and its log2-sum-exp go to fp32 scratch.
Pass 2: one program per (sequence, query head, new token) merges the splits, weighting each by exp2(lse_split − max).

Tiling (`_tiling`) grows the warps and shrinks the token tile with the pass-1 tile's BLOCK_G x BLOCK_D (fp32
counted twice), so that its Q tile and fp32 accumulator stay in registers: `gpuforge inspect` found the former
fixed 4 warps x 64 tokens spilling 8-1184 B per thread from 64 x 64 up. One tile still spills, as the best
trade-off found: fp32 with 33-64 query rows at head dim 256 (16 tokens, 8 warps) spills 48 B per thread on
sm_80 and 80 B on sm_90 (32 tokens: 144-248 B, 16 warps: 72-408 B); it is tolerated (compile_variants).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc
from gpuforge.kernels.triton._host import interpreted, operand


@triton.jit
def _paged_decode_split_kernel(
    q_ptr,  # (B, Hq, Sq, D) queries, unit stride along D
    k_cache_ptr, v_cache_ptr,  # (num_blocks, block_size, Hkv, D) pages, unit stride along D
    block_table_ptr,  # (B, max_blocks) int32 page numbers, any strides
    seq_lens_ptr,  # (B,) int32 tokens in the cache per sequence, any stride
    part_out_ptr,  # (B, Hq, Sq, num_splits, D) fp32 normalised partial outputs (contiguous)
    part_lse_ptr,  # (B, Hq, Sq, num_splits) fp32 log2-sum-exp of each split, -inf when it holds no token
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb, stride_tn,
    stride_l,
    num_heads, group, num_new, head_dim, block_size, num_splits, scale_log2,
    PARTITION: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Softmax-weighted sum of V over tokens [split·PARTITION, (split+1)·PARTITION) ∩ [0, seq_len − Sq + 1 + i)
    for each row (query head of the group, new token i)."""
    b = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)  # row = query head of the group x new token
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = hk * group + offs_g // num_new
    new = offs_g % num_new
    g_ok = offs_g < group * num_new
    d_ok = offs_d < head_dim
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + new[:, None] * stride_qs + offs_d[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)
    seq_len = tl.load(seq_lens_ptr + b * stride_l)
    row_len = seq_len - (num_new - 1 - new)  # causal among the new tokens (bottom-right aligned)
    lo = split * PARTITION
    hi = tl.minimum(lo + PARTITION, seq_len)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for start in range(lo, hi, BLOCK_N):
        tokens = start + offs_n
        tok_ok = tokens < hi
        page = tl.load(block_table_ptr + b * stride_tb + (tokens // block_size) * stride_tn, mask=tok_ok,
                       other=0).to(tl.int64)
        row = tokens % block_size
        kv_mask = tok_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + page[:, None] * stride_kb + row[:, None] * stride_kt + hk * stride_kh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + page[:, None] * stride_vb + row[:, None] * stride_vt + hk * stride_vh
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        visible = tok_ok[None, :] & (tokens[None, :] < row_len[:, None])
        s = tl.where(visible, tl.dot(q, tl.trans(k)) * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    row_ids = ((b * num_heads + heads) * num_new + new) * num_splits + split
    tl.store(part_out_ptr + row_ids[:, None] * head_dim + offs_d[None, :], out, mask=g_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + row_ids, lse, mask=g_ok)


@triton.jit
def _paged_decode_reduce_kernel(
    part_out_ptr,  # (B, Hq, Sq, num_splits, D) fp32 partial outputs
    part_lse_ptr,  # (B, Hq, Sq, num_splits) fp32 log2-sum-exp per split
    out_ptr,  # (B, Hq, Sq, D) output (contiguous)
    num_splits, head_dim,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """out = Σ_s w_s·o_s / Σ_s w_s with w_s = exp2(lse_s − max lse): the exact softmax over all splits."""
    row = tl.program_id(0).to(tl.int64)  # (b * Hq + h) * Sq + i
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    lse = tl.load(part_lse_ptr + row * num_splits + offs_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    o = tl.load(part_out_ptr + (row * num_splits + offs_s[:, None]) * head_dim + offs_d[None, :],
                mask=s_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * o, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + row * head_dim + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim)


LOG2E = 1.4426950408889634
# Pass-1 tile elements (BLOCK_G x BLOCK_D, fp32 counted twice) -> (BLOCK_N tokens per tile, num_warps), first fit.
_TILES = ((1024, 64, 4), (8192, 64, 8), (16384, 32, 8), (None, 16, 8))
# The one spill tolerated (module docstring): fp32, BLOCK_G 64, BLOCK_D 256, measured 48 B (sm_80), 80 B (sm_90).
TOLERATED_SPILL_BYTES = 80


def _tiling(block_g: int, block_d: int, fp32: bool) -> tuple[int, int, int]:
    """(PARTITION tokens per split, BLOCK_N tokens per tile, num_warps)."""
    if interpreted():
        return 32, 16, 1  # short CI contexts still get several splits and tiles
    elements = block_g * block_d * (2 if fp32 else 1)
    block_n, warps = next((n, w) for limit, n, w in _TILES if limit is None or elements <= limit)
    return 512, block_n, warps  # 512 tokens per split: enough splits to fill the SMs at B=1


def forward(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
            seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, Hq, Sq, D) -> (B, Hq, Sq, D); q (B, Hq, D) is one new token."""
    if q.dim() == 3:
        return forward(q.unsqueeze(2), k_cache, v_cache, block_table, seq_lens, scale).squeeze(2)
    batch, heads_q, num_new, head_dim = q.shape
    _, block_size, heads_kv, _ = k_cache.shape
    out = _alloc.empty_like(q)
    if out.numel() == 0:
        return out
    q, k_cache, v_cache = operand(q), operand(k_cache), operand(v_cache)
    group = heads_q // heads_kv
    block_g = max(16, triton.next_power_of_2(group * num_new))
    block_d = max(16, triton.next_power_of_2(head_dim))
    partition, block_n, num_warps = _tiling(block_g, block_d, q.dtype == torch.float32)
    num_splits = max(1, triton.cdiv(block_table.shape[1] * block_size, partition))
    part_out = _alloc.empty((batch, heads_q, num_new, num_splits, head_dim), dtype=torch.float32, device=q.device)
    part_lse = _alloc.empty((batch, heads_q, num_new, num_splits), dtype=torch.float32, device=q.device)
    _paged_decode_split_kernel[(batch, heads_kv, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, part_out, part_lse,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), *block_table.stride(), seq_lens.stride(0),
        heads_q, group, num_new, head_dim, block_size, num_splits, scale * LOG2E,
        PARTITION=partition, BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps)
    _paged_decode_reduce_kernel[(batch * heads_q * num_new,)](
        part_out, part_lse, out, num_splits, head_dim,
        BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d, num_warps=1 if interpreted() else 4)
    return out


def compile_variants() -> list:
    """The GPU tiling of `_tiling` for GQA groups x new tokens of 1..16, 17..32 and 33..64 rows (BLOCK_G) and
    head dims up to 32, 64, 128 and 256, per dtype; the merge kernel for 1, 8 and 64 splits
    (kernels/triton/_variants.py)."""
    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    # head_dim carries the JIT's divisibility-by-16 hint, as at a launch with a head dim that is a multiple of 16
    generic = ("stride_tn", "stride_l", "num_heads", "group", "num_new", "block_size", "num_splits")
    for dtype in ("float16", "bfloat16", "float32"):
        for block_d in (32, 64, 128, 256):
            for block_g in (16, 32, 64):
                partition, block_n, warps = _tiling(block_g, block_d, dtype == "float32")
                constexprs = {"PARTITION": partition, "BLOCK_G": block_g, "BLOCK_N": block_n, "BLOCK_D": block_d}
                pointers = {"q_ptr": dtype, "k_cache_ptr": dtype, "v_cache_ptr": dtype, "block_table_ptr": "int32",
                            "seq_lens_ptr": "int32", "part_out_ptr": "float32", "part_lse_ptr": "float32"}
                sig = signature(_paged_decode_split_kernel, constexprs, pointers, generic=generic,
                                floats=("scale_log2",))
                tolerated = TOLERATED_SPILL_BYTES if (dtype, block_g, block_d) == ("float32", 64, 256) else 0
                out.append(Variant("paged_attention", _paged_decode_split_kernel, sig, constexprs, warps, 3,
                                   f"{dtype} BLOCK_G={block_g} BLOCK_D={block_d} BLOCK_N={block_n} w{warps}",
                                   tolerated_spill_bytes=tolerated))
            for block_s in (1, 8, 64):
                constexprs = {"BLOCK_S": block_s, "BLOCK_D": block_d}
                pointers = {"part_out_ptr": "float32", "part_lse_ptr": "float32", "out_ptr": dtype}
                sig = signature(_paged_decode_reduce_kernel, constexprs, pointers, generic=("num_splits", "head_dim"))
                out.append(Variant("paged_attention", _paged_decode_reduce_kernel, sig, constexprs, 4, 3,
                                   f"{dtype} BLOCK_S={block_s} BLOCK_D={block_d}"))
    return out
