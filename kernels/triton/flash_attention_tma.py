"""FlashAttention-2 forward on tensor descriptors (TMA) for sm_90+: dense (B, H, S, D) fp16/bf16, D 64 or 128.

The same online softmax as kernels/triton/flash_attention.py (causal / sliding window by the one visibility
rule, GQA, LSE saved for the backward), but Q, K, V and O move through 3-D device-side tensor descriptors over
(batch·heads, S, D): on sm_90 each Q, K and V tile is one bulk tensor copy (UTMALDG) into swizzled shared
memory, K/V `num_stages` deep, and both dots lower to wgmma (HGMMA) with the Q tile and the fp32 accumulator in
registers; O leaves by a bulk tensor store. The descriptors bound-check each box (rows past S read as zero and
are not written), so only the tiles on the window's edges and the tails apply the mask.

Taken when the Triton backend runs a dense 16-bit call with contiguous q/k/v, D in (64, 128), on sm_90+, and
GPUFORGE_TRITON_TMA=1 (opt-in until a GPU run has checked it); numbers are checked in the interpreter.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc
from gpuforge.kernels.attention_problem import Problem
from gpuforge.kernels.triton import flash_attention
from gpuforge.kernels.triton._host import interpreted, tma_enabled, upcast_bf16_dot
from gpuforge.kernels.triton.flash_attention import (
    LOG2E,
    _finish_rows,
    _online_softmax_step,
    _tile_needs_mask,
    _visible,
)
from gpuforge.kernels.triton.matmul_tma import _scratch_on

HEAD_DIMS = (64, 128)
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head dim: one or two warpgroups over 128 query rows (wgmma m64
# per warpgroup); at D=128 the 128x128 K/V tiles need 8 warps to keep the fp32 scores in registers.
TILES = {64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 3)],
         128: [(128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3)]}


def configs(interpreter: bool, head_dim: int) -> list[triton.Config]:
    if interpreter:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in TILES[head_dim]]


@triton.jit
def _attn_fwd_tma_kernel(
    q_ptr, k_ptr, v_ptr,  # contiguous (B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D)
    out_ptr,  # contiguous, q's layout
    lse_ptr,  # float32 (B, Hq, Sq), contiguous
    seqlen_q, seqlen_k, num_heads, group, scale_log2, window_left, window_right,
    heads_kv_total,  # batch · KV heads (batch · query heads = heads_kv_total · group)
    UPCAST_OPERANDS: tl.constexpr,  # dots in fp32 (exact for bf16 operands): interpreter bf16-dot workaround
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query tile, batch·head): the Q tile in registers, K/V tiles streamed through shared
    memory by TMA, running max m and sum l rescale the fp32 accumulator; LSE (natural log) saved per row."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    bh_kv = b * (num_heads // group) + (pid_bh % num_heads) // group
    q_desc = tl.make_tensor_descriptor(q_ptr, shape=[heads_kv_total * group, seqlen_q, HEAD_DIM],
                                       strides=[seqlen_q * HEAD_DIM, HEAD_DIM, 1], block_shape=[1, BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(k_ptr, shape=[heads_kv_total, seqlen_k, HEAD_DIM],
                                       strides=[seqlen_k * HEAD_DIM, HEAD_DIM, 1], block_shape=[1, BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_ptr, shape=[heads_kv_total, seqlen_k, HEAD_DIM],
                                       strides=[seqlen_k * HEAD_DIM, HEAD_DIM, 1], block_shape=[1, BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(out_ptr, shape=[heads_kv_total * group, seqlen_q, HEAD_DIM],
                                       strides=[seqlen_q * HEAD_DIM, HEAD_DIM, 1], block_shape=[1, BLOCK_M, HEAD_DIM])
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = q_desc.load([pid_bh, m0, 0]).reshape(BLOCK_M, HEAD_DIM)
    if UPCAST_OPERANDS:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    offset = seqlen_k - seqlen_q
    lo = tl.maximum(m0 + offset - window_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M + offset + window_right, seqlen_k)
    for start_n in tl.range(lo, hi, BLOCK_N):
        k = k_desc.load([bh_kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([bh_kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        if UPCAST_OPERANDS:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k)) * scale_log2
        if _tile_needs_mask(m0, start_n, seqlen_q, seqlen_k, window_left, window_right, BLOCK_M, BLOCK_N):
            s = tl.where(_visible(offs_m, start_n + offs_n, seqlen_q, seqlen_k, window_left, window_right), s,
                         float("-inf"))
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc)
    out, lse = _finish_rows(m_i, l_i, acc)
    o_desc.store([pid_bh, m0, 0], out.to(o_desc.dtype).reshape(1, BLOCK_M, HEAD_DIM))
    tl.store(lse_ptr + pid_bh.to(tl.int64) * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)


@functools.cache
def _tuned(interpreter: bool, head_dim: int):
    return triton.autotune(configs(interpreter, head_dim), key=["HEAD_DIM"])(_attn_fwd_tma_kernel)


def accepts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> bool:
    """Dense, 16-bit, contiguous q/k/v with D in HEAD_DIMS (whose rows are then 16-byte aligned)."""
    return (not p.is_varlen and q.dtype in (torch.float16, torch.bfloat16) and p.head_dim in HEAD_DIMS
            and all(t.is_contiguous() for t in (q, k, v)))


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of the dense problem `p`, as kernels/triton/flash_attention.forward; `accepts` must hold."""
    if not accepts(q, k, v, p):
        raise ValueError(f"q, k, v: the TMA attention takes dense contiguous fp16/bf16 (B, H, S, D) with D in "
                         f"{HEAD_DIMS}; got {q.dtype} {tuple(q.shape)}")
    out = _alloc.empty_like(q)
    lse = _alloc.empty((p.batch, p.heads_q, p.seqlen_q), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    left, right = p.bounded_window()
    triton.set_allocator(_scratch_on(q.device))
    grid = lambda meta: (triton.cdiv(p.seqlen_q, meta["BLOCK_M"]), p.batch * p.heads_q)  # noqa: E731
    _tuned(interpreted(), p.head_dim)[grid](q, k, v, out, lse, p.seqlen_q, p.seqlen_k, p.heads_q, p.group,
                                           p.scale * LOG2E, left, right, p.batch * p.heads_kv,
                                           UPCAST_OPERANDS=upcast_bf16_dot(q.dtype), HEAD_DIM=p.head_dim)
    return out, lse


def routed_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p: Problem
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton backend's forward: this kernel where it applies (_host.tma_enabled and `accepts`), else the
    pointer-load kernel of flash_attention.py. Both save the same LSE, so either backward follows."""
    if tma_enabled(q.device) and accepts(q, k, v, p):
        return forward(q, k, v, p)
    return flash_attention.forward(q, k, v, p)


def compile_variants() -> list:
    """Every configuration per head dim and dtype, sm_90 and later (kernels/triton/_variants.py)."""
    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    for dtype in ("float16", "bfloat16"):
        for head_dim in HEAD_DIMS:
            for config in configs(False, head_dim):
                constexprs = {**config.kwargs, "HEAD_DIM": head_dim, "UPCAST_OPERANDS": False}
                pointers = {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "out_ptr": dtype, "lse_ptr": "float32"}
                sig = signature(_attn_fwd_tma_kernel, constexprs, pointers, floats=("scale_log2",),
                                generic=("group", "window_left", "window_right"))
                tile = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
                out.append(Variant("flash_attention", _attn_fwd_tma_kernel, sig, constexprs, config.num_warps,
                                   config.num_stages, f"{dtype} D{head_dim} {tile} w{config.num_warps} "
                                   f"s{config.num_stages} tma", tensor_cores=True, async_copies=True, tma=True,
                                   archs=(90, 100)))
    return out
