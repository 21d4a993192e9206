"""gf.int4_matmul: y = x @ Wᵀ with W (N, K) stored as int4 groups (gpuforge.quant.Int4Weight), W4A16.

Every backend kernel takes x as a contiguous (M, K) matrix and the Int4Weight's tensors (qweight uint8
(N, K/2), scales (N, K/G), zeros uint8 (N, K/G)) and returns a contiguous (M, N) in x's dtype, dequantizing
inside the GEMM with fp32 accumulation. AWQ's per-input-channel scales are applied here, to x, before the
kernel (x / in_scales), so kernels see only the group format. The torch reference is the oracle:
dequantize to x's dtype, then matmul. Backward: dx = dy @ W (through the torch dequantization: the int4
weight itself is frozen, as in QLoRA).
"""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc, cuda_ext, cupy_module
from gpuforge.kernels._dispatch import OpBackends
from gpuforge.kernels._selfcheck import CheckCase
from gpuforge.kernels._validate import check_tensor
from gpuforge.quant.format import Int4Weight, dequantize_int4

BACKENDS = OpBackends(
    op="int4_matmul",
    impls={
        "torch": "gpuforge.kernels.int4_matmul:int4_matmul_reference",
        "triton": "gpuforge.kernels.triton.int4_matmul:int4_matmul",
        "cuda": "gpuforge.kernels.int4_matmul:int4_matmul_cuda",
        "cupy": "gpuforge.kernels.int4_matmul:int4_matmul_cupy",
    },
    auto_order=("cuda", "triton", "cupy"),
    unsupported_dtypes={"cuda": (torch.float32,), "cupy": (torch.float32,)},
)

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dequantize(qweight, scales, zeros, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_int4(Int4Weight(qweight, scales, zeros, group_size, symmetric=False), dtype)


def int4_matmul_reference(x, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    return x @ _dequantize(qweight, scales, zeros, group_size, x.dtype).T


# The decode kernel of csrc/int4_matmul.cu takes up to this many rows; more rows go to the tiled kernel.
CUDA_DECODE_MAX_M = 16


def _split_k(m: int, n: int, k: int, group_size: int) -> int:
    """K slices for the decode kernel: enough blocks (8 output channels each) to fill ~132 SMs a few times
    over, each slice a whole number of 32-element chunks and at least 256 long."""
    blocks = -(-n // 8)
    split = 1
    while blocks * split < 4 * 132 and k % (split * 2 * 32) == 0 and k // (split * 2) >= 256:
        split *= 2
    return split


def int4_matmul_cuda(x, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """csrc/int4_matmul.cu: the decode kernel (M ≤ 16, split-K) or the tiled kernel (any M)."""
    m, k = x.shape
    n = qweight.shape[0]
    out = _alloc.empty((m, n), dtype=x.dtype, device=x.device)
    decode = (m <= CUDA_DECODE_MAX_M and k % 32 == 0 and group_size % 32 == 0
              and x.data_ptr() % 16 == 0 and qweight.data_ptr() % 16 == 0)
    split = _split_k(m, n, k, group_size) if decode else 0
    workspace = torch.empty((split, m, n) if split > 1 else (0,), dtype=torch.float32, device=x.device)
    cuda_ext.extension().int4_matmul(
        x.data_ptr(), qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(),
        workspace.data_ptr(), m, n, k, group_size, split, cuda_ext.dtype_code(x), cuda_ext.dtype_code(scales),
        cuda_ext.stream_handle(x))
    return out


# Tile of csrc/int4_matmul.cu's tiled kernel (kTileM, kTileN, kThreads).
CUPY_TILE_M, CUPY_TILE_N, CUPY_THREADS = 64, 64, 256


def int4_matmul_cupy(x, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    """The tiled kernel of csrc/int4_matmul.cu through NVRTC (any M)."""
    import numpy as np

    m, k = x.shape
    n = qweight.shape[0]
    out = _alloc.empty((m, n), dtype=x.dtype, device=x.device)
    types = cupy_module.CPP_TYPES
    name = f"gpuforge::int4_matmul_tiled_kernel<{types[x.dtype]}, {types[scales.dtype]}>"
    kern = cupy_module.kernel("int4_matmul.cu", (name,), name)
    grid = (-(-n // CUPY_TILE_N), -(-m // CUPY_TILE_M))
    args = (*(cupy_module.as_cupy(t) for t in (x, qweight, scales, zeros, out)),
            *(np.int64(v) for v in (m, n, k, group_size)))
    cupy_module.launch(kern, grid, (CUPY_THREADS,), args, x.device)
    return out


@torch.library.custom_op("gpuforge::int4_matmul", mutates_args=())
def _int4_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, backend: str) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    n = qweight.shape[0]
    if rows.shape[0] == 0 or n == 0:
        return x.new_zeros((*x.shape[:-1], n))
    kernel = BACKENDS.impl(backend)
    out = kernel(rows, qweight.contiguous(), scales.contiguous(), zeros.contiguous(), group_size)
    return out.view(*x.shape[:-1], n)


@_int4_matmul_op.register_fake
def _(x, qweight, scales, zeros, group_size, backend):
    return x.new_empty((*x.shape[:-1], qweight.shape[0]))


def _setup_context(ctx, inputs, output):
    x, qweight, scales, zeros, group_size, backend = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.group_size = group_size


def _backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    grad_x = grad @ _dequantize(qweight, scales, zeros, ctx.group_size, grad.dtype)
    return grad_x, None, None, None, None, None


_int4_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x, qweight) -> None:
    check_tensor(x, "x", dtypes=X_DTYPES, min_ndim=1)
    if not isinstance(qweight, Int4Weight):
        raise TypeError(f"qweight: expected a gpuforge.quant.Int4Weight, got {type(qweight).__name__}")
    qweight.validate()
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x: expected last dim K={k} (qweight has shape (N={n}, K={k})), got shape "
                         f"{tuple(x.shape)}")
    if x.device != qweight.device:
        raise ValueError(f"qweight: expected device {x.device} (that of x), got {qweight.device}")


def int4_matmul(x: torch.Tensor, qweight: Int4Weight, *, backend: str = "auto") -> torch.Tensor:
    """x (..., K) @ Wᵀ -> (..., N) in x's dtype, W (N, K) the int4 weight `qweight`. x: float16/bfloat16
    (float32 on the torch and triton backends), any strides. Differentiable with respect to x."""
    _check(x, qweight)
    chosen = BACKENDS.select(backend, x.device)
    if not BACKENDS.supports(chosen, x.dtype):
        if backend != "auto":
            raise TypeError(f"x: backend {chosen!r} takes float16/bfloat16 activations, got {x.dtype}")
        chosen = "triton"
    if qweight.in_scales is not None:
        x = (x.float() / qweight.in_scales).to(x.dtype)
    return _int4_matmul_op(x, qweight.qweight, qweight.scales, qweight.zeros, qweight.group_size, chosen)


# Max relative error vs float64 per activation dtype (the float64 reference uses the same int4 weight).
SELFCHECK_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _forward_and_grad(x, grad, fn):
    x = x.detach().requires_grad_()
    out = fn(x)
    (dx,) = torch.autograd.grad(out, (x,), grad)
    return out.detach(), dx


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    from gpuforge.quant import quantize_int4

    cases = []
    for dtype, tol in SELFCHECK_TOL.items():
        for m, n, k, group in ((1, 67, 128, 32), (5, 33, 192, 64), (17, 96, 256, 128), (3, 40, 96, -1)):
            generator = torch.Generator().manual_seed(m * 1000 + n)
            w = quantize_int4(torch.randn(n, k, generator=generator), group, symmetric=m % 2 == 0).to(device)
            x = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
            grad = torch.randn(m, n, generator=generator).to(device=device, dtype=dtype)
            w64 = dequantize_int4(w, torch.float64)
            label = f"{str(dtype).removeprefix('torch.')} ({m},{k})@int4({n},{k}) g{w.group_size} fwd+bwd"
            cases.append(CheckCase(
                "int4_matmul", label,
                run=lambda backend, x=x, w=w, g=grad: _forward_and_grad(
                    x, g, lambda t: int4_matmul(t, w, backend=backend)),
                reference=lambda x=x, w64=w64, g=grad: _forward_and_grad(x.double(), g.double(),
                                                                         lambda t: t @ w64.T),
                tol=tol, dtype=dtype))
    return cases
