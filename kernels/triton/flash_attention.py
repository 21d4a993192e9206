"""FlashAttention-2 in Triton: forward, backward (dQ, dK, dV), causal / sliding window, GQA, dense and varlen.

Visibility of key j to query i (0-based, within one sequence; offset = seqlen_k - seqlen_q aligns the last query
with the last key, as FlashAttention-2): i + offset - window_left <= j <= i + offset + window_right. The host
folds `causal` into window_right = 0 and an unbounded side into a bound larger than any sequence, so the
kernels see one rule and skip every key (query) tile outside [lo, hi) without loading it.

Layouts: dense q (B, H, S, D) with batch stride; varlen q (total, H, D) with cu_seqlens offsets (batch stride
unused). The head dim must have stride 1; D is padded in registers to a power of two (masked loads).
LSE is float32, natural log, (B, Hq, Sq) dense or (Hq, total_q) varlen; -inf for a query that sees no key.
The autotune space is per padded head dim, operand width and architecture (kernels/triton/_attention_configs.py):
only tiles that compile without spills and within shared memory on the GPUs that may pick them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc
from gpuforge.kernels.attention_problem import Problem
from gpuforge.kernels.triton._attention_configs import PREPROCESS_BLOCK_M, SM90, TILES, family, tiles
from gpuforge.kernels.triton._host import interpreted, operand

LOG2E = 1.4426950408889634


@triton.jit
def _seq_bounds(cu_ptr, b, seqlen, IS_VARLEN: tl.constexpr):
    """(start row, length) of sequence b: from cu_seqlens when varlen, else (0, seqlen)."""
    if IS_VARLEN:
        start = tl.load(cu_ptr + b).to(tl.int64)
        length = (tl.load(cu_ptr + b + 1) - start).to(tl.int32)
    else:
        start = b * 0
        length = seqlen
    return start, length


@triton.jit
def _visible(offs_m, offs_n, seqlen_q, seqlen_k, window_left, window_right):
    """(BLOCK_M, BLOCK_N) mask: query row in range, key in range and inside the (left, right) window."""
    diag = offs_m[:, None] + (seqlen_k - seqlen_q)
    cols = offs_n[None, :]
    return ((offs_m[:, None] < seqlen_q) & (cols < seqlen_k)
            & (cols >= diag - window_left) & (cols <= diag + window_right))


@triton.jit
def _tile_needs_mask(m0, n0, len_q, len_k, window_left, window_right, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Whether some (query, key) pair of the tile is out of range or outside the window. Only the tiles on the
    window's edges (the causal diagonal) and the tails need the mask; interior tiles skip it."""
    offset = len_k - len_q
    return ((m0 + BLOCK_M > len_q) | (n0 + BLOCK_N > len_k)
            | (n0 < m0 + BLOCK_M - 1 + offset - window_left) | (n0 + BLOCK_N - 1 > m0 + offset + window_right))


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc):
    """One key tile of the online softmax: scores `s` (log2 units, −inf where masked) raise the running row max
    m_i, the running sum l_i and the fp32 accumulator are rescaled by exp2(m_old − m_new), and p·v is added."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def _finish_rows(m_i, l_i, acc):
    """(output rows, natural-log LSE): a row that saw no key gives 0 and −inf."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    return out, tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # inputs; head dim stride 1
    out_ptr,  # output, layout of q (contiguous)
    lse_ptr,  # float32 log-sum-exp per query row
    cu_q_ptr, cu_k_ptr,  # int32 cumulative sequence lengths (varlen only)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    seqlen_q, seqlen_k,  # dense lengths (varlen: the maxima)
    num_heads, group,  # query heads; query heads per KV head
    head_dim, scale_log2,  # softmax scale · log2(e): exponentials are exp2
    window_left, window_right,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query tile, batch·head): the Q tile stays in registers/SRAM while K/V tiles stream
    through; running row max m and sum l (online softmax) rescale the fp32 accumulator; LSE saved per row."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    q_start, len_q = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 < len_q:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        q_base = q_ptr + b * stride_qb + h * stride_qh + q_start * stride_qs
        k_base = k_ptr + b * stride_kb + hk * stride_kh + k_start * stride_ks
        v_base = v_ptr + b * stride_vb + hk * stride_vh + k_start * stride_vs
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :],
                    mask=(offs_m[:, None] < len_q) & d_ok[None, :], other=0.0)
        m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        offset = len_k - len_q
        # key tiles that any row of this query tile can see; the rest are never loaded
        lo = tl.maximum(m0 + offset - window_left, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(m0 + BLOCK_M + offset + window_right, len_k)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = (cols[None, :] < len_k) & d_ok[:, None]
            k_t = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=kv_mask, other=0.0)
            s = tl.dot(q, k_t) * scale_log2
            if _tile_needs_mask(m0, start_n, len_q, len_k, window_left, window_right, BLOCK_M, BLOCK_N):
                s = tl.where(_visible(offs_m, cols, len_q, len_k, window_left, window_right), s, float("-inf"))
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :],
                        mask=(cols[:, None] < len_k) & d_ok[None, :], other=0.0)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
        out, lse = _finish_rows(m_i, l_i, acc)
        o_base = out_ptr + b * stride_ob + h * stride_oh + q_start * stride_os
        tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(offs_m[:, None] < len_q) & d_ok[None, :])
        tl.store(lse_ptr + b * stride_lb + h * stride_lh + q_start + offs_m, lse, mask=offs_m < len_q)


@triton.jit
def _attn_bwd_preprocess_kernel(
    out_ptr, dout_ptr,  # forward output and its gradient, same strides
    dlse_ptr,  # gradient of the LSE output, float32, layout of lse
    delta_ptr,  # output: rowsum(dO ⊙ O) − dLSE, float32, layout of lse
    cu_q_ptr,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    seqlen_q, num_heads, head_dim,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """D_i = Σ_d dO_id·O_id − dLSE_i, the row term of dS = P ⊙ (dP − D) (the LSE gradient folds in here)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    q_start, len_q = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < len_q) & (offs_d[None, :] < head_dim)
    offsets = b * stride_ob + h * stride_oh + (q_start + offs_m[:, None]) * stride_os + offs_d[None, :]
    o = tl.load(out_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    row = b * stride_lb + h * stride_lh + q_start + offs_m
    dlse = tl.load(dlse_ptr + row, mask=offs_m < len_q, other=0.0)
    tl.store(delta_ptr + row, tl.sum(o * do, 1) - dlse, mask=offs_m < len_q)


@triton.jit
def _dkdv_tile(k, v, q, do, lse_log2, delta, rows, offs_n, m0, n0, len_q, len_k, window_left, window_right,
               scale_log2, dk, dv, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query tile's part of a key tile's dK (unscaled) and dV: Pᵀ recomputed from K, Q and the LSE (log2
    units), dSᵀ = Pᵀ (V dOᵀ - delta); returns (dk, dv, dSᵀ). Shared by the pointer and the descriptor kernels."""
    s_t = tl.dot(k, tl.trans(q)) * scale_log2  # (BLOCK_N, BLOCK_M): keys × queries
    p_t = tl.exp2(s_t - lse_log2[None, :])
    if _tile_needs_mask(m0, n0, len_q, len_k, window_left, window_right, BLOCK_M, BLOCK_N):
        visible_t = tl.trans(_visible(rows, offs_n, len_q, len_k, window_left, window_right))
        p_t = tl.where(visible_t, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do)
    dp_t = tl.dot(v, tl.trans(do))
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q)
    return dk, dv, ds_t


@triton.jit
def _dq_tile(q, do, k, v, lse_log2, delta, offs_m, cols, m0, n0, len_q, len_k, window_left, window_right,
             scale_log2, dq, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key tile's part of a query tile's dQ (unscaled): P recomputed, dS = P (dO Vᵀ - delta), dQ += dS K."""
    p = tl.exp2(tl.dot(q, tl.trans(k)) * scale_log2 - lse_log2[:, None])
    if _tile_needs_mask(m0, n0, len_q, len_k, window_left, window_right, BLOCK_M, BLOCK_N):
        p = tl.where(_visible(offs_m, cols, len_q, len_k, window_left, window_right), p, 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr,  # inputs (dout: layout of q, contiguous)
    lse_ptr, delta_ptr,  # float32 per query row
    dk_ptr, dv_ptr,  # outputs, layout of k (contiguous)
    dq_acc_ptr,  # float32 dQ accumulator (layout of q, contiguous), written with atomics when ATOMIC_DQ
    cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,  # dout and dq_acc
    stride_dkb, stride_dkh, stride_dks,  # dk and dv
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_heads_kv, group, head_dim, scale, scale_log2,
    window_left, window_right,
    IS_VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (key tile, batch·KV head): K, V and the dK, dV accumulators stay on chip while the Q,
    dO tiles of every query head of the group stream through; P is recomputed from Q, K and the saved LSE.
    With ATOMIC_DQ the same pass adds dS·K into dQ with atomics (fast, not bit-reproducible)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads_kv
    hk = pid_bh % num_heads_kv
    q_start, len_q = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 < len_k:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        kv_mask = (offs_n[:, None] < len_k) & d_ok[None, :]
        k = tl.load(k_ptr + b * stride_kb + hk * stride_kh + (k_start + offs_n[:, None]) * stride_ks
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + b * stride_vb + hk * stride_vh + (k_start + offs_n[:, None]) * stride_vs
                    + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        offset = len_k - len_q
        # query tiles that see any key of this tile
        lo = tl.maximum(n0 - offset - window_right, 0) // BLOCK_M * BLOCK_M
        hi = tl.minimum(n0 + BLOCK_N - offset + window_left, len_q)
        for g in range(0, group):
            h = hk * group + g
            q_base = q_ptr + b * stride_qb + h * stride_qh + q_start * stride_qs
            o_base = b * stride_ob + h * stride_oh + q_start * stride_os
            l_base = b * stride_lb + h * stride_lh + q_start
            for start_m in range(lo, hi, BLOCK_M):
                rows = start_m + offs_m
                q_mask = (rows[:, None] < len_q) & d_ok[None, :]
                q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(dout_ptr + o_base + rows[:, None] * stride_os + offs_d[None, :],
                             mask=q_mask, other=0.0)
                lse = tl.load(lse_ptr + l_base + rows, mask=rows < len_q, other=0.0) * 1.4426950408889634
                delta = tl.load(delta_ptr + l_base + rows, mask=rows < len_q, other=0.0)
                dk, dv, ds_t = _dkdv_tile(k, v, q, do, lse, delta, rows, offs_n, start_m, n0, len_q, len_k,
                                          window_left, window_right, scale_log2, dk, dv, BLOCK_M, BLOCK_N)
                if ATOMIC_DQ:
                    dq_part = tl.dot(tl.trans(ds_t.to(k.dtype)), k) * scale
                    tl.atomic_add(dq_acc_ptr + o_base + rows[:, None] * stride_os + offs_d[None, :], dq_part,
                                  mask=q_mask)
        d_base = b * stride_dkb + hk * stride_dkh + (k_start + offs_n[:, None]) * stride_dks + offs_d[None, :]
        tl.store(dk_ptr + d_base, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptr + d_base, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr,  # inputs (dout: layout of dq)
    lse_ptr, delta_ptr,  # float32 per query row
    dq_ptr,  # output, layout of q (contiguous)
    cu_q_ptr, cu_k_ptr,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_ob, stride_oh, stride_os,  # dout and dq
    stride_lb, stride_lh,
    seqlen_q, seqlen_k, num_heads, group, head_dim, scale, scale_log2,
    window_left, window_right,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (query tile, batch·head): Q, dO and the dQ accumulator stay on chip while K/V tiles
    stream through (the forward's loop, recomputing P from the LSE); no atomics, so bit-reproducible."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // group
    q_start, len_q = _seq_bounds(cu_q_ptr, b, seqlen_q, IS_VARLEN)
    k_start, len_k = _seq_bounds(cu_k_ptr, b, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 < len_q:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < head_dim
        q_mask = (offs_m[:, None] < len_q) & d_ok[None, :]
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + (q_start + offs_m[:, None]) * stride_qs
                    + offs_d[None, :], mask=q_mask, other=0.0)
        o_offsets = b * stride_ob + h * stride_oh + (q_start + offs_m[:, None]) * stride_os + offs_d[None, :]
        do = tl.load(dout_ptr + o_offsets, mask=q_mask, other=0.0)
        row = b * stride_lb + h * stride_lh + q_start + offs_m
        lse = tl.load(lse_ptr + row, mask=offs_m < len_q, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + row, mask=offs_m < len_q, other=0.0)
        k_base = k_ptr + b * stride_kb + hk * stride_kh + k_start * stride_ks
        v_base = v_ptr + b * stride_vb + hk * stride_vh + k_start * stride_vs
        dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        offset = len_k - len_q
        lo = tl.maximum(m0 + offset - window_left, 0) // BLOCK_N * BLOCK_N
        hi = tl.minimum(m0 + BLOCK_M + offset + window_right, len_k)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + offs_n
            kv_mask = (cols[:, None] < len_k) & d_ok[None, :]
            k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            dq = _dq_tile(q, do, k, v, lse, delta, offs_m, cols, m0, start_n, len_q, len_k, window_left,
                          window_right, scale_log2, dq, BLOCK_M, BLOCK_N)
        tl.store(dq_ptr + o_offsets, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


def _configs(kernel: str, block_d: int, fp32: bool, arch: int, interpreter: bool):
    if interpreter:
        # small tiles so that the CI's short sequences still cross tile boundaries; no tuning in the interpreter
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in tiles(kernel, block_d, fp32, arch)]


_KEY = ["BLOCK_D", "IS_VARLEN"]


@functools.cache
def _kernels(block_d: int, fp32: bool, arch: int, interpreter: bool):
    """(forward, dK/dV, dK/dV with atomic dQ, dQ) kernels autotuned over the tiles of this head dim, operand
    width and architecture family (kernels/triton/_attention_configs.py), built at the first call (the
    interpreter switch and the device are known then, not at import)."""
    fwd = triton.autotune(_configs("forward", block_d, fp32, arch, interpreter), key=_KEY)(_attn_fwd_kernel)
    dkdv = triton.autotune(_configs("dkdv", block_d, fp32, arch, interpreter), key=_KEY)(_attn_bwd_dkdv_kernel)
    dkdv_atomic = triton.autotune(_configs("dkdv_atomic", block_d, fp32, arch, interpreter), key=_KEY,
                                  reset_to_zero=["dq_acc_ptr"])(_attn_bwd_dkdv_kernel)
    dq = triton.autotune(_configs("dq", block_d, fp32, arch, interpreter), key=_KEY)(_attn_bwd_dq_kernel)
    return fwd, dkdv, dkdv_atomic, dq


def _launch_kernels(q: torch.Tensor, bd: int):
    """The autotuned kernels for q's device (its compute capability, read at call time) and dtype."""
    if interpreted():
        return _kernels(bd, False, 0, True)
    return _kernels(bd, q.dtype == torch.float32, family(torch.cuda.get_device_capability(q.device)), False)


def _preprocess_block_m(bd: int) -> int:
    return 16 if interpreted() else PREPROCESS_BLOCK_M[bd]


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two (at least 16, the smallest tl.dot operand)."""
    return max(16, triton.next_power_of_2(head_dim))


def _strides3(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides: dense (B, H, S, D), varlen (total, H, D) with no batch stride."""
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _lse_shape(p: Problem, total_q: int) -> tuple[int, ...]:
    return (p.heads_q, total_q) if p.is_varlen else (p.batch, p.heads_q, p.seqlen_q)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    out = _alloc.empty_like(q)
    q, k, v = operand(q), operand(k), operand(v)
    lse = _alloc.empty(_lse_shape(p, q.shape[0]), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    cu_q, cu_k = p.offsets(q)
    left, right = p.bounded_window()
    fwd = _launch_kernels(q, block_d(p.head_dim))[0]
    grid = lambda meta: (triton.cdiv(p.seqlen_q, meta["BLOCK_M"]), p.batch * p.heads_q)  # noqa: E731
    fwd[grid](q, k, v, out, lse, cu_q, cu_k,
              *_strides3(q, p.is_varlen), *_strides3(k, p.is_varlen), *_strides3(v, p.is_varlen),
              *_strides3(out, p.is_varlen), *_lse_strides(lse, p.is_varlen),
              p.seqlen_q, p.seqlen_k, p.heads_q, p.group, p.head_dim, p.scale * LOG2E,
              left, right, IS_VARLEN=p.is_varlen, BLOCK_D=block_d(p.head_dim))
    return out, lse


def backward(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, p: Problem, deterministic: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _alloc.empty_like(q), _alloc.empty_like(k), _alloc.empty_like(v)
    q, k, v = operand(q), operand(k), operand(v)
    dout, out = operand(dout).contiguous(), operand(out).contiguous()
    dlse, lse = dlse.float().contiguous(), lse.contiguous()
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cu_q, cu_k = p.offsets(q)
    left, right = p.bounded_window()
    varlen, bd = p.is_varlen, block_d(p.head_dim)
    _, dkdv, dkdv_atomic, dq_kernel = _launch_kernels(q, bd)
    dkdv = dkdv if deterministic else dkdv_atomic
    lse_strides = _lse_strides(lse, varlen)
    delta = _alloc.empty_like(lse)
    pre_m = _preprocess_block_m(bd)
    _attn_bwd_preprocess_kernel[(triton.cdiv(p.seqlen_q, pre_m), p.batch * p.heads_q)](
        out, dout, dlse, delta, cu_q, *_strides3(out, varlen), *lse_strides, p.seqlen_q, p.heads_q, p.head_dim,
        IS_VARLEN=varlen, BLOCK_M=pre_m, BLOCK_D=bd)
    # dq_acc is fp32 for the atomics; when deterministic it is unused and dq comes from its own kernel
    dq_acc = torch.zeros(dout.shape if not deterministic else (1,), dtype=torch.float32, device=q.device)
    common = (*_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(dout, varlen))
    scales = (p.head_dim, p.scale, p.scale * LOG2E, left, right)
    grid_kv = lambda meta: (triton.cdiv(p.seqlen_k, meta["BLOCK_N"]), p.batch * p.heads_kv)  # noqa: E731
    dkdv[grid_kv](q, k, v, dout, lse, delta, dk, dv, dq_acc, cu_q, cu_k, *common, *_strides3(dk, varlen),
                  *lse_strides, p.seqlen_q, p.seqlen_k, p.heads_kv, p.group, *scales,
                  IS_VARLEN=varlen, ATOMIC_DQ=not deterministic, BLOCK_D=bd)
    if deterministic:
        grid_q = lambda meta: (triton.cdiv(p.seqlen_q, meta["BLOCK_M"]), p.batch * p.heads_q)  # noqa: E731
        dq_kernel[grid_q](q, k, v, dout, lse, delta, dq, cu_q, cu_k, *common, *lse_strides,
                          p.seqlen_q, p.seqlen_k, p.heads_q, p.group, *scales, IS_VARLEN=varlen, BLOCK_D=bd)
    else:
        dq.copy_(dq_acc)
    return dq, dk, dv


def compile_variants() -> list:
    """Every autotune configuration of the forward, dK/dV (deterministic and atomic-dQ lists) and dQ kernels on the
    architectures that may pick it, and the preprocess launch, for head dims padded to 32, 64, 128 and 256, per
    dtype, dense layout (kernels/triton/_variants.py). head_dim carries the JIT's divisibility-by-16
    specialisation, as at a launch with any head dim that is a multiple of 16: without it the head-dim masks
    defeat vector loads and the pipeliner's asynchronous copies."""
    from gpuforge.kernels.triton._variants import Variant, signature

    generic = ("num_heads", "num_heads_kv", "group", "window_left", "window_right")
    floats = ("scale", "scale_log2")
    kernels = {"forward": (_attn_fwd_kernel, {}), "dq": (_attn_bwd_dq_kernel, {}),
               "dkdv": (_attn_bwd_dkdv_kernel, {"ATOMIC_DQ": False}),
               "dkdv_atomic": (_attn_bwd_dkdv_kernel, {"ATOMIC_DQ": True})}
    out = []
    for dtype in ("float16", "bfloat16", "float32"):
        tensors = {name: dtype for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "dout_ptr", "dq_ptr", "dk_ptr",
                                            "dv_ptr")}
        tensors |= {name: "float32" for name in ("lse_ptr", "delta_ptr", "dlse_ptr", "dq_acc_ptr")}
        tensors |= {"cu_q_ptr": "int32", "cu_k_ptr": "int32"}
        for block_d in (32, 64, 128, 256):
            for name, (kernel, flags) in kernels.items():
                for m, n, warps, stages, archs in TILES[name][(block_d, dtype == "float32")]:
                    constexprs = {"BLOCK_M": m, "BLOCK_N": n, **flags, "IS_VARLEN": False, "BLOCK_D": block_d}
                    pointers = {k: t for k, t in tensors.items() if k in kernel.arg_names}
                    sig = signature(kernel, constexprs, pointers, generic=generic, floats=floats)
                    label = f"{dtype} D{block_d} {m}x{n} w{warps} s{stages}"
                    label += "".join(f" {k}={v}" for k, v in flags.items())
                    out.append(Variant("flash_attention", kernel, sig, constexprs, warps, stages, label,
                                       tensor_cores=True, async_copies=stages > 1,
                                       archs=archs + ((100,) if SM90 in archs else ())))
            pre_m = PREPROCESS_BLOCK_M[block_d]
            constexprs = {"IS_VARLEN": False, "BLOCK_M": pre_m, "BLOCK_D": block_d}
            pointers = {n: t for n, t in tensors.items() if n in _attn_bwd_preprocess_kernel.arg_names}
            sig = signature(_attn_bwd_preprocess_kernel, constexprs, pointers, generic=generic)
            out.append(Variant("flash_attention", _attn_bwd_preprocess_kernel, sig, constexprs, 4, 3,
                               f"{dtype} D{block_d} BLOCK_M={pre_m}"))
    return out
