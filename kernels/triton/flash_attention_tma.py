"""FlashAttention-2 forward and backward on tensor descriptors (TMA) for sm_90+: dense (B, H, S, D) fp16/bf16, D 64
or 128.

The same online softmax as kernels/triton/flash_attention.py (causal / sliding window by the one visibility
rule, GQA, LSE saved for the backward), but Q, K, V and O move through 3-D device-side tensor descriptors over
(batch·heads, S, D): on sm_90 each Q, K and V tile is one bulk tensor copy (UTMALDG) into swizzled shared
memory, K/V `num_stages` deep, and both dots lower to wgmma (HGMMA) with the Q tile and the fp32 accumulator in
registers; O leaves by a bulk tensor store. The descriptors bound-check each box (rows past S read as zero and
are not written), so only the tiles on the window's edges and the tails apply the mask.

The backward is the pointer-load kernels' two-kernel form (dK/dV per key tile over the group's query heads, then
dQ per query tile; no atomics), with every Q, dO, K and V tile a TMA box and dQ, dK, dV stored by TMA; the
per-tile math is flash_attention.py's own (_dkdv_tile, _dq_tile).

Both are taken when the Triton backend runs a dense 16-bit call with contiguous q/k/v, D in (64, 128), on sm_90+,
and GPUFORGE_TRITON_TMA=1 (opt-in until a GPU run has checked it); numbers are checked in the interpreter.
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
    _attn_bwd_preprocess_kernel,
    _dkdv_tile,
    _dq_tile,
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
# The backward's (BLOCK_M, BLOCK_N, num_warps, num_stages): the pointer-load kernels' sm_90 tiles
# (_attention_configs.py) whose MMA rows (keys for dK/dV, query rows for dQ) are at least 64, so that every dot is
# wgmma (a 32-row one lowers to mma.sync); all compile on sm_90 and sm_100 without a spill (dK/dV D64 64x64 w8
# spilled 8 B on sm_100 and is left out).
BWD_TILES = {"dkdv": {64: [(32, 64, 4, 2)], 128: [(32, 64, 8, 2), (16, 64, 8, 2)]},
             "dq": {64: [(64, 32, 4, 2), (64, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)],
                    128: [(64, 64, 4, 2), (64, 32, 4, 2), (64, 64, 8, 2)]}}


def configs(interpreter: bool, head_dim: int, kernel: str = "forward") -> list[triton.Config]:
    """The tiles of `kernel` ("forward", "dkdv" or "dq") at this head dim."""
    if interpreter:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    tiles = TILES[head_dim] if kernel == "forward" else BWD_TILES[kernel][head_dim]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st) for m, n, w, st in tiles]


@triton.jit
def _rows(ptr, heads, seqlen, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr):
    """The tensor descriptor of a contiguous (batch · heads, seqlen, D) tensor in boxes of BLOCK rows."""
    return tl.make_tensor_descriptor(ptr, shape=[heads, seqlen, HEAD_DIM], strides=[seqlen * HEAD_DIM, HEAD_DIM, 1],
                                     block_shape=[1, BLOCK, HEAD_DIM])


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
    q_desc = _rows(q_ptr, heads_kv_total * group, seqlen_q, HEAD_DIM, BLOCK_M)
    k_desc = _rows(k_ptr, heads_kv_total, seqlen_k, HEAD_DIM, BLOCK_N)
    v_desc = _rows(v_ptr, heads_kv_total, seqlen_k, HEAD_DIM, BLOCK_N)
    o_desc = _rows(out_ptr, heads_kv_total * group, seqlen_q, HEAD_DIM, BLOCK_M)
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


@triton.jit
def _attn_bwd_dkdv_tma_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr,  # contiguous (B, Hq, Sq, D), (B, Hkv, Sk, D) x 2, q's layout
    lse_ptr, delta_ptr,  # float32 (B, Hq, Sq), contiguous
    dk_ptr, dv_ptr,  # contiguous, k's layout
    seqlen_q, seqlen_k, num_heads_kv, group, scale, scale_log2, window_left, window_right,
    heads_kv_total,  # batch · KV heads
    UPCAST_OPERANDS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (key tile, batch·KV head): K, V (one TMA box each) and the dK, dV accumulators stay on
    chip while the Q and dO tiles of every query head of the group stream in by TMA; no atomics."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rows_q, rows_k = heads_kv_total * group, heads_kv_total
    q_desc = _rows(q_ptr, rows_q, seqlen_q, HEAD_DIM, BLOCK_M)
    do_desc = _rows(dout_ptr, rows_q, seqlen_q, HEAD_DIM, BLOCK_M)
    k_desc = _rows(k_ptr, rows_k, seqlen_k, HEAD_DIM, BLOCK_N)
    v_desc = _rows(v_ptr, rows_k, seqlen_k, HEAD_DIM, BLOCK_N)
    dk_desc = _rows(dk_ptr, rows_k, seqlen_k, HEAD_DIM, BLOCK_N)
    dv_desc = _rows(dv_ptr, rows_k, seqlen_k, HEAD_DIM, BLOCK_N)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    k = k_desc.load([pid_bh, n0, 0]).reshape(BLOCK_N, HEAD_DIM)
    v = v_desc.load([pid_bh, n0, 0]).reshape(BLOCK_N, HEAD_DIM)
    if UPCAST_OPERANDS:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    offset = seqlen_k - seqlen_q
    lo = tl.maximum(n0 - offset - window_right, 0) // BLOCK_M * BLOCK_M  # the query rows that see a key here
    hi = tl.minimum(n0 + BLOCK_N - offset + window_left, seqlen_q)
    first_head = (pid_bh // num_heads_kv) * num_heads_kv * group + (pid_bh % num_heads_kv) * group
    for g in range(0, group):
        head = first_head + g  # the query head's row in (batch · Hq)
        for start_m in tl.range(lo, hi, BLOCK_M):
            rows = start_m + offs_m
            q = q_desc.load([head, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
            do = do_desc.load([head, start_m, 0]).reshape(BLOCK_M, HEAD_DIM)
            if UPCAST_OPERANDS:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            row_ptr = head.to(tl.int64) * seqlen_q + rows
            lse = tl.load(lse_ptr + row_ptr, mask=rows < seqlen_q, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_ptr + row_ptr, mask=rows < seqlen_q, other=0.0)
            dk, dv, _ = _dkdv_tile(k, v, q, do, lse, delta, rows, offs_n, start_m, n0, seqlen_q, seqlen_k,
                                   window_left, window_right, scale_log2, dk, dv, BLOCK_M, BLOCK_N)
    dk_desc.store([pid_bh, n0, 0], (dk * scale).to(dk_desc.dtype).reshape(1, BLOCK_N, HEAD_DIM))
    dv_desc.store([pid_bh, n0, 0], dv.to(dv_desc.dtype).reshape(1, BLOCK_N, HEAD_DIM))


@triton.jit
def _attn_bwd_dq_tma_kernel(
    q_ptr, k_ptr, v_ptr, dout_ptr,  # as the dK/dV kernel's
    lse_ptr, delta_ptr,
    dq_ptr,  # contiguous, q's layout
    seqlen_q, seqlen_k, num_heads, group, scale, scale_log2, window_left, window_right,
    heads_kv_total,
    UPCAST_OPERANDS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per (query tile, batch·head): Q, dO and the dQ accumulator stay on chip while the K/V tiles
    stream in by TMA (the forward's loop, P recomputed from the LSE); no atomics, so bit-reproducible."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    bh_kv = (pid_bh // num_heads) * (num_heads // group) + (pid_bh % num_heads) // group
    rows_q, rows_k = heads_kv_total * group, heads_kv_total
    q_desc = _rows(q_ptr, rows_q, seqlen_q, HEAD_DIM, BLOCK_M)
    do_desc = _rows(dout_ptr, rows_q, seqlen_q, HEAD_DIM, BLOCK_M)
    dq_desc = _rows(dq_ptr, rows_q, seqlen_q, HEAD_DIM, BLOCK_M)
    k_desc = _rows(k_ptr, rows_k, seqlen_k, HEAD_DIM, BLOCK_N)
    v_desc = _rows(v_ptr, rows_k, seqlen_k, HEAD_DIM, BLOCK_N)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    q = q_desc.load([pid_bh, m0, 0]).reshape(BLOCK_M, HEAD_DIM)
    do = do_desc.load([pid_bh, m0, 0]).reshape(BLOCK_M, HEAD_DIM)
    if UPCAST_OPERANDS:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row_ptr = pid_bh.to(tl.int64) * seqlen_q + offs_m
    lse = tl.load(lse_ptr + row_ptr, mask=offs_m < seqlen_q, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + row_ptr, mask=offs_m < seqlen_q, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    offset = seqlen_k - seqlen_q
    lo = tl.maximum(m0 + offset - window_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(m0 + BLOCK_M + offset + window_right, seqlen_k)
    for start_n in tl.range(lo, hi, BLOCK_N):
        k = k_desc.load([bh_kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        v = v_desc.load([bh_kv, start_n, 0]).reshape(BLOCK_N, HEAD_DIM)
        if UPCAST_OPERANDS:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        dq = _dq_tile(q, do, k, v, lse, delta, offs_m, start_n + offs_n, m0, start_n, seqlen_q, seqlen_k,
                      window_left, window_right, scale_log2, dq, BLOCK_M, BLOCK_N)
    dq_desc.store([pid_bh, m0, 0], (dq * scale).to(dq_desc.dtype).reshape(1, BLOCK_M, HEAD_DIM))


KERNELS = {"forward": _attn_fwd_tma_kernel, "dkdv": _attn_bwd_dkdv_tma_kernel, "dq": _attn_bwd_dq_tma_kernel}


@functools.cache
def _tuned(interpreter: bool, head_dim: int, kernel: str = "forward"):
    return triton.autotune(configs(interpreter, head_dim, kernel), key=["HEAD_DIM"])(KERNELS[kernel])


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


def backward(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             out: torch.Tensor, lse: torch.Tensor, p: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the dense problem `p`, as kernels/triton/flash_attention.backward with deterministic=True
    (dQ from its own kernel, no atomics); `accepts(q, k, v, p)` must hold."""
    if not accepts(q, k, v, p):
        raise ValueError(f"q, k, v: the TMA attention takes dense contiguous fp16/bf16 (B, H, S, D) with D in "
                         f"{HEAD_DIMS}; got {q.dtype} {tuple(q.shape)}")
    dq, dk, dv = _alloc.empty_like(q), _alloc.empty_like(k), _alloc.empty_like(v)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    dout, out = dout.contiguous(), out.contiguous()
    dlse, lse = dlse.float().contiguous(), lse.contiguous()
    delta = _alloc.empty_like(lse)
    pre_m = flash_attention._preprocess_block_m(p.head_dim)
    no_offsets = torch.empty(1, dtype=torch.int32, device=q.device)  # dense: the varlen offsets are not read
    _attn_bwd_preprocess_kernel[(triton.cdiv(p.seqlen_q, pre_m), p.batch * p.heads_q)](
        out, dout, dlse, delta, no_offsets, *out.stride()[:3], *lse.stride()[:2], p.seqlen_q, p.heads_q,
        p.head_dim, IS_VARLEN=False, BLOCK_M=pre_m, BLOCK_D=p.head_dim)
    left, right = p.bounded_window()
    triton.set_allocator(_scratch_on(q.device))
    common = dict(UPCAST_OPERANDS=upcast_bf16_dot(q.dtype), HEAD_DIM=p.head_dim)
    scales = (p.scale, p.scale * LOG2E, left, right, p.batch * p.heads_kv)
    grid_kv = lambda meta: (triton.cdiv(p.seqlen_k, meta["BLOCK_N"]), p.batch * p.heads_kv)  # noqa: E731
    _tuned(interpreted(), p.head_dim, "dkdv")[grid_kv](q, k, v, dout, lse, delta, dk, dv, p.seqlen_q, p.seqlen_k,
                                                       p.heads_kv, p.group, *scales, **common)
    grid_q = lambda meta: (triton.cdiv(p.seqlen_q, meta["BLOCK_M"]), p.batch * p.heads_q)  # noqa: E731
    _tuned(interpreted(), p.head_dim, "dq")[grid_q](q, k, v, dout, lse, delta, dq, p.seqlen_q, p.seqlen_k,
                                                    p.heads_q, p.group, *scales, **common)
    return dq, dk, dv


def routed_backward(dout, dlse, q, k, v, out, lse, p: Problem, deterministic: bool):
    """The Triton backend's backward: these descriptor kernels where the forward's apply (bit-reproducible
    whatever `deterministic` asks), else the pointer-load kernels of flash_attention.py."""
    if tma_enabled(q.device) and accepts(q, k, v, p):
        return backward(dout, dlse, q, k, v, out, lse, p)
    return flash_attention.backward(dout, dlse, q, k, v, out, lse, p, deterministic)


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
        tensors = {name: dtype for name in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "dout_ptr", "dq_ptr", "dk_ptr",
                                            "dv_ptr")} | {"lse_ptr": "float32", "delta_ptr": "float32"}
        for head_dim in HEAD_DIMS:
            for name, kernel in KERNELS.items():
                for config in configs(False, head_dim, name):
                    constexprs = {**config.kwargs, "HEAD_DIM": head_dim, "UPCAST_OPERANDS": False}
                    pointers = {arg: t for arg, t in tensors.items() if arg in kernel.arg_names}
                    sig = signature(kernel, constexprs, pointers, floats=("scale", "scale_log2"),
                                    generic=("num_heads", "num_heads_kv", "group", "window_left", "window_right"))
                    tile = f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}"
                    out.append(Variant("flash_attention", kernel, sig, constexprs, config.num_warps,
                                       config.num_stages, f"{dtype} D{head_dim} {tile} w{config.num_warps} "
                                       f"s{config.num_stages} tma {name}", tensor_cores=True, async_copies=True,
                                       tma=True, archs=(90, 100)))
    return out
