"""cuda backend of gf.flash_attention (dense layout only): csrc/flash_attention.cu forward (mma.sync for
fp16/bf16 with D 64 or 128 on sm_80+, a row-per-warp baseline otherwise) and csrc/flash_attention_bwd.cu
backward (row-per-warp, P recomputed from the LSE, no atomics: bit-reproducible whatever `deterministic` says)."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc
from gpuforge.kernels.attention_problem import Problem
from gpuforge.kernels.cuda import extension


def _dense_only(p: Problem) -> None:
    if p.is_varlen:
        raise ValueError("backend='cuda': flash_attention_varlen has no CUDA C++ kernel; use backend='triton'")


def _unit_stride(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def forward(q, k, v, p: Problem):
    _dense_only(p)
    q, k, v = _unit_stride(q, k, v)
    out = _alloc.empty_like(q)
    lse = _alloc.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    extension.call("flash_attention_forward", q.device, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                   lse.data_ptr(), p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim,
                   p.window_left, p.window_right, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], p.scale,
                   extension.dtype_code(q))
    return out, lse


def backward(dout, dlse, q, k, v, out, lse, p: Problem, deterministic: bool):
    _dense_only(p)
    q, k, v = _unit_stride(q, k, v)
    out, dout, lse, dlse = (t.contiguous() for t in (out, dout, lse, dlse.float()))
    dq, dk, dv = _alloc.empty_like(q), _alloc.empty_like(k), _alloc.empty_like(v)
    delta = _alloc.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    extension.call("flash_attention_backward", q.device,
                   *(t.data_ptr() for t in (q, k, v, out, dout, lse, dlse, dq, dk, dv, delta)), p.batch, p.heads_q,
                   p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim, p.window_left, p.window_right, *q.stride()[:3],
                   *k.stride()[:3], *v.stride()[:3], p.scale, extension.dtype_code(q))
    return dq, dk, dv
