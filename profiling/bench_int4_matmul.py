"""int4_matmul (W4A16) benchmark: every backend beside the bf16 cuBLAS GEMM on the dense weights and PyTorch's
own int4 kernel (`torch._weight_int4pack_mm`, tinygemm) where it runs.

The issue's targets (H100/H200, group 128): decode (M = 1, 4, 16; N×K = 4096×4096, 11008×4096, 4096×11008,
8192×8192) at >= 2.5× the bf16 cuBLAS GEMM (4× is the byte ratio) and >= 1.0× torch's int4 kernel; prefill
(M = 2048) at >= 0.7× cuBLAS. Decode is memory-bound, so `bytes` counts the packed weights, scales, zeros,
x and the output once each.
"""

from __future__ import annotations

import torch

import gpuforge as gf
from gpuforge import backends
from gpuforge.kernels.int4_matmul import BACKENDS
from gpuforge.profiling.harness import BenchCase
from gpuforge.quant import Int4Weight, dequantize_int4, quantize_int4, unpack_int4

GROUP_SIZE = 128
LLM_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192))  # (N, K) of Llama-7B-like layers


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int, int]]:
    if device.type != "cuda":
        return [(1, 96, 128), (16, 64, 256)]
    decode = [(m, n, k) for m in (1, 4, 16) for n, k in LLM_SHAPES]
    prefill = [(2048, n, k) for n, k in (LLM_SHAPES[:1] if quick else LLM_SHAPES)]
    return decode + prefill


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


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    status = backends.available()
    runnable = [b for b in BACKENDS.impls if b != "torch" and status[b][0] and backends.runs_on(b, device)
                and BACKENDS.supports(b, dtype)]
    tinygemm = _tinygemm_runs(device)
    baseline = "cuBLAS" if device.type == "cuda" else "torch"
    cases = []
    for m, n, k in _shapes(device, quick):
        def make_inputs(m=m, n=n, k=k):
            w = torch.randn(n, k, device=device) / k**0.5
            q = quantize_int4(w, GROUP_SIZE, scale_dtype=torch.bfloat16)
            dense = dequantize_int4(q, dtype)
            tiny = tinygemm_operands(q) if tinygemm else (None, None)
            return torch.randn(m, k, device=device, dtype=dtype), dense, q, *tiny

        fns = {baseline: lambda x, dense, q, tw, tsz: x @ dense.T}
        fns |= {b: (lambda x, dense, q, tw, tsz, b=b: gf.int4_matmul(x, q, backend=b)) for b in runnable}
        if tinygemm:
            fns["torch int4 (tinygemm)"] = (
                lambda x, dense, q, tw, tsz: torch.ops.aten._weight_int4pack_mm(x, tw, GROUP_SIZE, tsz))
        element = torch.finfo(dtype).bits // 8
        weight_bytes = n * k // 2 + n * (k // GROUP_SIZE) * 3  # codes, bf16 scales, uint8 zeros
        cases.append(BenchCase(
            op="int4_matmul", shape=f"M={m} N={n} K={k} g{GROUP_SIZE}", dtype=dtype, size=m,
            make_inputs=make_inputs, fns=fns, baseline=baseline,
            bytes=weight_bytes + (m * k + m * n) * element, flops=2 * m * n * k,
            reference=lambda x, dense, q, tw, tsz: x.double() @ dequantize_int4(q, torch.float64).T))
    return cases
