"""int4_matmul (W4A16) benchmark: every backend beside the bf16 cuBLAS GEMM on the dense weights and PyTorch's
own int4 kernel (`torch._weight_int4pack_mm`, tinygemm) where it runs.

The speed targets (H100/H200, group 128): decode (M = 1, 4, 16; N×K = 4096×4096, 11008×4096, 4096×11008,
8192×8192) at >= 2.5× the bf16 cuBLAS GEMM (4× is the byte ratio) and >= 1.0× torch's int4 kernel; prefill
(M = 2048) at >= 0.7× cuBLAS. Decode is memory-bound, so `bytes` counts the packed weights, scales, zeros,
x and the output once each. fp16-activation rows (full sweep) run without tinygemm, which takes bf16 only. The
prefill fwd+bwd rows time the forward and dx = dy·W (the backward dequantizes W in torch on every backend), beside
the dense GEMM's forward and dx.
"""

from __future__ import annotations

import torch

from gpuforge.kernels.int4_matmul import BACKENDS, int4_matmul
from gpuforge.profiling.harness import BenchCase
from gpuforge.quant import Int4Weight, dequantize_int4, quantize_int4, unpack_int4

GROUP_SIZE = 128
TINYGEMM = "torch int4 (tinygemm)"
LLM_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192))  # (N, K) of Llama-7B-like layers


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    if device.type != "cuda":
        return [(1, 96, 128), (16, 64, 256)]
    decode = [(m, n, k) for m in (1, 4, 16) for n, k in LLM_SHAPES]
    prefill = [(2048, n, k) for n, k in (LLM_SHAPES[:1] if quick else LLM_SHAPES)]
    return decode + prefill


def _dtypes(device: torch.device, quick: bool) -> tuple[torch.dtype, ...]:
    if device.type != "cuda":
        return (torch.float32,)
    return (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16)


def _backward_shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    if device.type != "cuda":
        return [(16, 64, 256)]
    return [] if quick else [(2048, n, k) for n, k in LLM_SHAPES[:2]]


def tinygemm_operands(q: Int4Weight, inner_k_tiles: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """The same int4 weight in torch's tinygemm layout: codes packed high nibble first, then
    `_convert_weight_to_int4pack`; (K/G, N, 2) bf16 scale and offset, where tinygemm decodes
    (q − 8)·scale + offset, so offset = (8 − zero)·scale gives our (q − zero)·scale."""
    codes = unpack_int4(q.qweight)
    packed = (codes[:, ::2] << 4) | codes[:, 1::2]
    weight = torch.ops.aten._convert_weight_to_int4pack(packed.contiguous(), inner_k_tiles)
    scales = q.scales.float()
    offsets = (8 - q.zeros.float()) * scales
    scales_and_zeros = torch.stack((scales.T, offsets.T), dim=-1).to(torch.bfloat16).contiguous()
    return weight, scales_and_zeros


def _tinygemm_runs(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        q = quantize_int4(torch.randn(64, 256, device=device), GROUP_SIZE)
        weight, sz = tinygemm_operands(q)
        torch.ops.aten._weight_int4pack_mm(torch.randn(1, 256, device=device, dtype=torch.bfloat16), weight,
                                           GROUP_SIZE, sz)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _with_backward(fn):
    """fn(x, *weights, dy) -> dx: the forward, then the gradient of the activations."""
    def run(x, *rest):
        *weights, dy = rest
        return torch.autograd.grad(fn(x, *weights), x, dy)[0]
    return run


def _reference(x, dense, q, tw, tsz):
    return x.double() @ dequantize_int4(q, torch.float64).T


def _reference_backward(x, dense, q, tw, tsz, dy):
    return dy.double() @ dequantize_int4(q, torch.float64)


def _case(device, dtype, m, n, k, runnable, tinygemm, backward: bool) -> BenchCase:
    baseline = "cuBLAS" if device.type == "cuda" else "torch"

    def make_inputs():
        w = torch.randn(n, k, device=device) / k**0.5
        q = quantize_int4(w, GROUP_SIZE, scale_dtype=torch.bfloat16)
        dense = dequantize_int4(q, dtype)
        tiny = tinygemm_operands(q) if tinygemm else (None, None)
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=backward)
        return (x, dense, q, *tiny) + ((torch.randn(m, n, device=device, dtype=dtype),) if backward else ())

    fns = {baseline: lambda x, dense, q, tw, tsz: x @ dense.T}
    fns |= {b: (lambda x, dense, q, tw, tsz, b=b: int4_matmul(x, q, backend=b)) for b in runnable}
    if tinygemm:
        fns[TINYGEMM] = lambda x, dense, q, tw, tsz: torch.ops.aten._weight_int4pack_mm(x, tw, GROUP_SIZE, tsz)
    if backward:
        fns = {label: _with_backward(fn) for label, fn in fns.items()}
    element = torch.finfo(dtype).bits // 8
    weight_bytes = n * k // 2 + n * (k // GROUP_SIZE) * 3  # codes, bf16 scales, uint8 zeros
    activation_bytes = (m * k + m * n) * element
    return BenchCase(
        op="int4_matmul", shape=f"M={m} N={n} K={k} g{GROUP_SIZE}{' fwd+bwd' if backward else ''}", dtype=dtype,
        size=m, make_inputs=make_inputs, fns=fns, baseline=baseline,
        secondary_baseline=TINYGEMM if tinygemm else None,
        bytes=weight_bytes + activation_bytes if not backward else 2 * weight_bytes + 3 * activation_bytes,
        flops=2 * m * n * k * (2 if backward else 1),
        reference=_reference_backward if backward else _reference)


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    cases = []
    for dtype in _dtypes(device, quick):
        runnable = [b for b in BACKENDS.runnable(device, dtype) if b != "torch"]
        tinygemm = dtype == torch.bfloat16 and _tinygemm_runs(device)
        cases += [_case(device, dtype, m, n, k, runnable, tinygemm, False) for m, n, k in _shapes(device, quick)]
        cases += [_case(device, dtype, m, n, k, runnable, False, True) for m, n, k in _backward_shapes(device, quick)]
    return cases
