"""cuda backend of gf.flash_attention (dense layout only): csrc/flash_attention.cu forward (mma.sync for
fp16/bf16 with D 64 or 128 on sm_80+, a row-per-warp baseline otherwise; on a compute capability 9.0 device with
GPUFORGE_CUDA_WGMMA=1, fp16/bf16 at D 128 take csrc/flash_attention_wgmma.cu's TMA + wgmma kernel, opt-in:
kernels/cuda/hopper.py) and the backward of csrc/flash_attention_bwd.cu (P recomputed from the LSE; on tensor
cores, csrc/flash_attention_bwd_mma.cu, where the mma.sync forward applies, row-per-warp otherwise; no atomics:
bit-reproducible whatever `deterministic` says)."""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc
from gpuforge.kernels.attention_problem import Problem
from gpuforge.kernels.cuda import extension
from gpuforge.kernels.cuda.hopper import rows_aligned, wgmma_enabled


def _dense_only(p: Problem) -> None:
    if p.is_varlen:
        raise ValueError("backend='cuda': flash_attention_varlen has no CUDA C++ kernel; use backend='triton'")


def _unit_stride(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def wgmma_fits(q, k, v, p: Problem) -> bool:
    """What csrc/flash_attention_wgmma.cu takes: fp16/bf16, D 128, at least one key, TMA-ready strides."""
    return (q.dtype in (torch.float16, torch.bfloat16) and p.head_dim == 128 and p.seqlen_k > 0
            and rows_aligned(q, k, v))


def forward(q, k, v, p: Problem, wgmma: bool | None = None):
    """wgmma: None lets GPUFORGE_CUDA_WGMMA decide; True asks for the sm_90a kernel (the benchmark's row; inputs
    it cannot take are an error), False for csrc/flash_attention.cu."""
    _dense_only(p)
    q, k, v = _unit_stride(q, k, v)
    out = _alloc.empty_like(q)
    lse = _alloc.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    hopper = wgmma_fits(q, k, v, p) and wgmma_enabled(q.device) if wgmma is None else wgmma
    name = "flash_attention_forward_wgmma" if hopper else "flash_attention_forward"
    extension.call(name, q.device, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
                   p.batch, p.heads_q, p.heads_kv, p.seqlen_q, p.seqlen_k, p.head_dim, p.window_left,
                   p.window_right, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], p.scale, extension.dtype_code(q))
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
