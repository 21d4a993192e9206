"""rope benchmark: q and k rotated (forward, and forward + backward) by every backend beside HF transformers'
apply_rotary_pos_emb written out (q·cos + rotate_half(q)·sin, eager) and torch.compile of it, in GB/s and as a
fraction of the measured copy bandwidth.

Bytes are the minimum RoPE must move: q and k read and written once each way; the cos/sin tables (one row per
position, shared by every head) are left out."""

from __future__ import annotations

import functools

import torch

from gpuforge.kernels.rope import BACKENDS, rope, rope_float64
from gpuforge.profiling.harness import BenchCase


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def _hf_eager(q, k, cos, sin):
    """HF's apply_rotary_pos_emb: cos/sin (B, S, D) broadcast over the heads."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@functools.cache
def _compiled():
    return torch.compile(_hf_eager)


def _forward_fns(device: torch.device, runnable: list[str]) -> dict:
    fns = {"torch": _hf_eager}
    if device.type == "cuda":
        fns["torch.compile"] = lambda *a: _compiled()(*a)
    return fns | {name: (lambda q, k, cos, sin, name=name: rope(q, k, cos, sin, backend=name)) for name in runnable}


def _with_backward(forward):
    """fn(q, k, cos, sin, dq, dk) -> (d q, d k)."""
    def run(q, k, cos, sin, dq, dk):
        return torch.autograd.grad(forward(q, k, cos, sin), (q, k), (dq, dk))
    return run


def _reference(q, k, cos, sin):
    return rope_float64(q, cos, sin, False), rope_float64(k, cos, sin, False)


def _reference_backward(q, k, cos, sin, dq, dk):
    return torch.autograd.grad(_reference(q, k, cos, sin), (q, k), (dq, dk))


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int, int, int]]:
    """(B, Hq, Hkv, S, D): Llama-3-8B's 32 query and 8 key/value heads of 128."""
    if device.type == "cuda":
        return [(4, 32, 8, 4096, 128)] if quick else [(1, 32, 8, 4096, 128), (4, 32, 8, 4096, 128)]
    return [(1, 4, 2, 64, 64)] if quick else [(1, 4, 2, 64, 64), (2, 8, 2, 128, 64)]


def _tables(b, s, d, device, dtype):
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=device, dtype=torch.float32) / d)
    angles = torch.arange(s, device=device, dtype=torch.float32)[:, None] * inv_freq
    emb = torch.cat((angles, angles), -1).expand(b, s, d)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    runnable = [b for b in BACKENDS.runnable(device) if b != "torch"]
    dtypes = (torch.bfloat16,) if device.type == "cuda" else (torch.float32,)
    secondary = "torch.compile" if device.type == "cuda" else None
    cases = []
    for dtype in dtypes:
        for b, hq, hkv, s, d in _shapes(device, quick):
            element = torch.finfo(dtype).bits // 8
            moved = 2 * b * (hq + hkv) * s * d * element
            forward = _forward_fns(device, runnable)

            def make_forward_inputs(b=b, hq=hq, hkv=hkv, s=s, d=d, dtype=dtype):
                q = torch.randn(b, s, hq, d, device=device, dtype=dtype).transpose(1, 2)  # HF's layout
                k = torch.randn(b, s, hkv, d, device=device, dtype=dtype).transpose(1, 2)
                return (q, k, *_tables(b, s, d, device, dtype))

            def make_backward_inputs(b=b, hq=hq, hkv=hkv, s=s, d=d, dtype=dtype):
                q, k, cos, sin = make_forward_inputs(b, hq, hkv, s, d, dtype)
                return q.requires_grad_(), k.requires_grad_(), cos, sin, torch.randn_like(q), torch.randn_like(k)

            label = f"B{b} Hq{hq} Hkv{hkv} S{s} D{d}"
            cases.append(BenchCase(
                op="rope", shape=f"{label} fwd", dtype=dtype, size=b * hq * s * d,
                make_inputs=make_forward_inputs, fns=forward, baseline="torch", secondary_baseline=secondary,
                bytes=moved, reference=_reference))
            cases.append(BenchCase(
                op="rope", shape=f"{label} fwd+bwd", dtype=dtype, size=b * hq * s * d,
                make_inputs=make_backward_inputs, fns={k: _with_backward(f) for k, f in forward.items()},
                baseline="torch", secondary_baseline=secondary, bytes=2 * moved, reference=_reference_backward))
    return cases
