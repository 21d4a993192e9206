"""Triton batched matmul: C[z] = A[z] @ B[z], block-tiled, fp32 accumulation, any strides.

Each program computes one BLOCK_M × BLOCK_N tile of C, streaming BLOCK_K-wide slabs of A and B through shared
memory (Triton pipelines those loads over `num_stages` buffers) into tensor-core dots. Programs are visited in
grouped (swizzled) order: GROUP_M consecutive programs sweep down a column of tiles, so the B slabs they read
stay in L2 while the A rows are reused across the group. fp32 inputs use tf32 on a GPU (kernels/matmul.py).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc
from gpuforge.kernels.triton import matmul_tma
from gpuforge.kernels.triton._host import interpreted, tma_enabled, upcast_bf16_dot

# BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps. 16-bit operands: the Triton tutorial's H100 sweep plus deeper
# pipelines. fp32 (tf32) operands take twice the shared memory per stage and twice the registers per loaded
# element: `gpuforge inspect` found five of the 16-bit tiles over the 227 KB per-block limit with fp32 (up to
# 385 KB) and the 4-warp 128x128 ones spilling 56-376 B; these fp32 tiles halve BLOCK_K or the warps' share of
# the accumulator so that every one fits sm_80's 163 KB without spills.
TILES_16BIT = [(128, 256, 64, 3, 8), (256, 128, 64, 3, 8), (128, 256, 64, 4, 8), (128, 128, 64, 4, 4),
               (128, 128, 64, 4, 8), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 128, 32, 4, 4),
               (64, 64, 64, 4, 4), (64, 32, 32, 5, 2), (32, 64, 32, 5, 2)]
TILES_FP32 = [(128, 256, 32, 3, 8), (256, 128, 32, 3, 8), (128, 128, 32, 4, 8), (128, 64, 32, 4, 4),
              (64, 128, 32, 4, 4), (64, 64, 32, 4, 4), (64, 32, 32, 5, 2), (32, 64, 32, 5, 2)]


def configs(interpreter: bool, dtype: torch.dtype = torch.float16) -> list[triton.Config]:
    """Autotuning space on a GPU for operands of `dtype`; a single small config under the interpreter, where
    tuning would only cost time."""
    if interpreter:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8},
                              num_warps=4, num_stages=1)]
    shapes = TILES_FP32 if dtype == torch.float32 else TILES_16BIT
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                          num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in shapes]


@triton.jit
def _matmul_kernel(
    a_ptr,  # A, (batch, M, K) with strides (stride_az, stride_am, stride_ak); stride_az is 0 when broadcast
    b_ptr,  # B, (batch, K, N) with strides (stride_bz, stride_bk, stride_bn)
    c_ptr,  # C, (batch, M, N) with strides (stride_cz, stride_cm, stride_cn); written once per element
    M, N, K,
    stride_az, stride_am, stride_ak,
    stride_bz, stride_bk, stride_bn,
    stride_cz, stride_cm, stride_cn,
    INPUT_PRECISION: tl.constexpr,  # "tf32" on a GPU (fp32 inputs only; Triton's default), "ieee" interpreted
    UPCAST_OPERANDS: tl.constexpr,  # dot in fp32 (exact for bf16 operands): interpreter bf16-dot workaround
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    z = tl.program_id(1).to(tl.int64)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    # Grouped order: programs pid .. pid+GROUP_M·num_pid_n cover GROUP_M row-tiles × every column-tile.
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows/columns past the edge wrap around (stay in bounds, no mask in the inner loop); they are not stored.
    rows = offs_m % M
    cols = offs_n % N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + z * stride_az + rows[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = b_ptr + z * stride_bz + offs_k[:, None] * stride_bk + cols[None, :] * stride_bn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_left = K - k_start
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST_OPERANDS:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    c_ptrs = c_ptr + z * stride_cz + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@functools.cache
def _tuned(interpreter: bool, dtype: torch.dtype):
    """The kernel autotuned over `configs(interpreter, dtype)`, built at the first call (the interpreter switch
    is known then, not at import)."""
    return triton.autotune(configs=configs(interpreter, dtype), key=["M", "N", "K"])(_matmul_kernel)


def _use_tma(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The persistent TMA kernel (matmul_tma.py) for one 16-bit product it accepts (_host.tma_enabled)."""
    return a.shape[0] == 1 and tma_enabled(a.device) and matmul_tma.accepts(a[0], b[0])


def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (batch, M, K) @ b (batch, K, N), any strides -> contiguous (batch, M, N) in a's dtype."""
    if _use_tma(a, b):
        return matmul_tma.forward(a[0], b[0]).unsqueeze(0)
    batch, m, k = a.shape
    n = b.shape[2]
    out = _alloc.empty((batch, m, n), dtype=a.dtype, device=a.device)
    precision = "tf32" if a.is_cuda else "ieee"

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), batch

    _tuned(interpreted(), a.dtype)[grid](a, b, out, m, n, k, *a.stride(), *b.stride(), *out.stride(),
                                INPUT_PRECISION=precision, UPCAST_OPERANDS=upcast_bf16_dot(a.dtype))
    return out


def compile_variants() -> list:
    """Every autotune configuration on a GPU, per dtype (fp32 as tf32), contiguous operands
    (kernels/triton/_variants.py)."""
    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    for dtype in ("float32", "float16", "bfloat16"):
        for config in configs(interpreter=False, dtype=getattr(torch, dtype)):
            constexprs = {**config.kwargs, "INPUT_PRECISION": "tf32", "UPCAST_OPERANDS": False}
            pointers = {"a_ptr": dtype, "b_ptr": dtype, "c_ptr": dtype}
            sig = signature(_matmul_kernel, constexprs, pointers, ones=("stride_ak", "stride_bn", "stride_cn"))
            tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
            out.append(Variant("matmul", _matmul_kernel, sig, constexprs, config.num_warps, config.num_stages,
                               f"{dtype} {tile} w{config.num_warps} s{config.num_stages}", tensor_cores=True,
                               async_copies=config.num_stages > 1))
    return out
