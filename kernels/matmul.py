"""gf.matmul: (..., M, K) @ (K, N), or batched (..., M, K) @ (..., K, N) with broadcast batch dims.

Every backend kernel computes one batched product C[z] = A[z] @ B[z] on (batch, M, K) and (batch, K, N) views
with arbitrary strides (batch stride 0 for a broadcast operand) into a contiguous (batch, M, N) output, with
fp32 accumulation. This module turns user shapes into those views (folding the batch into M when B is a
plain matrix, so it stays one GEMM), validates, registers the torch.library op and its autograd
(dA = dC·Bᵀ, dB = Aᵀ·dC through the same kernels, summed over broadcast batch dims), and holds the torch
reference and the CUDA C++ / cupy host glue.

Precision: fp32 inputs on a GPU use tf32 tensor cores in the Triton kernel (10-bit mantissa products, fp32
accumulation; relative error ~1e-3, like torch with allow_tf32=True). The CUDA C++ and numba kernels compute
fp32 exactly; the interpreters on a CPU compute fp32 exactly too.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gpuforge.kernels import _alloc, cuda_ext, cupy_module
from gpuforge.kernels._dispatch import OpBackends
from gpuforge.kernels._selfcheck import CheckCase
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_tensor

# Each impl takes a (batch, M, K) and b (batch, K, N), any strides, and returns a contiguous (batch, M, N).
BACKENDS = OpBackends(
    op="matmul",
    impls={
        "torch": "gpuforge.kernels.matmul:matmul_reference",
        "triton": "gpuforge.kernels.triton.matmul:matmul",
        "cuda": "gpuforge.kernels.matmul:matmul_cuda",
        "cupy": "gpuforge.kernels.matmul:matmul_cupy",
        "numba": "gpuforge.kernels.numba.matmul:matmul",
    },
    auto_order=("triton", "cuda", "cupy", "numba"),
    unsupported_dtypes={"numba": (torch.bfloat16,)},
)


def matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a, b)


def _strides_args(a: torch.Tensor, b: torch.Tensor) -> tuple[int, ...]:
    return (*a.stride(), *b.stride())


def _rows_aligned(t: torch.Tensor) -> bool:
    return t.stride(2) == 1 and t.stride(1) % 8 == 0 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0


def _for_tensor_cores(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16/bf16 operands with K and N multiples of 8 are copied row-major when they are not already (the
    backward's Bᵀ and Aᵀ, transposed views): an O(MK + KN) copy that moves the O(MNK) product onto tensor
    cores. Anything else keeps its strides and takes the tiled kernel."""
    if a.dtype == torch.float32 or a.shape[2] % 8 or b.shape[2] % 8:
        return a, b
    return (a if _rows_aligned(a) else a.contiguous()), (b if _rows_aligned(b) else b.contiguous())


def matmul_cuda(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """csrc/matmul.cu: tensor cores for fp16/bf16 with 16-byte-aligned rows, the tiled kernel otherwise."""
    a, b = _for_tensor_cores(a, b)
    batch, m, k = a.shape
    n = b.shape[2]
    out = _alloc.empty((batch, m, n), dtype=a.dtype, device=a.device)
    cuda_ext.extension().matmul(a.data_ptr(), b.data_ptr(), out.data_ptr(), m, n, k, batch,
                                *_strides_args(a, b), cuda_ext.dtype_code(a), cuda_ext.stream_handle(a))
    return out


# Block tiles and threads of csrc/matmul.cu's kernels (kTiledBlockM/N, kTiledThreads; kMma…).
TILED_TILE, TILED_THREADS = 64, 256
MMA_TILE, MMA_THREADS = 128, 256


def _mma_path_applies(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The AOT launcher's test (csrc/matmul.cu, mma_path_applies): fp16/bf16 on sm_80+, rows contiguous and
    16-byte aligned."""
    return (a.dtype != torch.float32 and a.shape[2] % 8 == 0 and b.shape[2] % 8 == 0
            and _rows_aligned(a) and _rows_aligned(b) and torch.cuda.get_device_capability(a.device)[0] >= 8)


def matmul_cupy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """csrc/matmul.cu through NVRTC, with the AOT launcher's choice of kernel."""
    import numpy as np

    a, b = _for_tensor_cores(a, b)
    batch, m, k = a.shape
    n = b.shape[2]
    out = _alloc.empty((batch, m, n), dtype=a.dtype, device=a.device)
    ctype = cupy_module.CPP_TYPES[a.dtype]
    tiled, mma = f"gpuforge::matmul_tiled_kernel<{ctype}>", f"gpuforge::matmul_mma_kernel<{ctype}>"
    names = (tiled,) if a.dtype == torch.float32 else (tiled, mma)  # one NVRTC module per dtype
    if _mma_path_applies(a, b):
        kern = cupy_module.kernel("matmul.cu", names, mma)
        grid = (-(-m // MMA_TILE) * -(-n // MMA_TILE), batch)
        sizes = (m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1))
        threads = MMA_THREADS
    else:
        kern = cupy_module.kernel("matmul.cu", names, tiled)
        grid = (-(-m // TILED_TILE) * -(-n // TILED_TILE), batch)
        sizes = (m, n, k, *_strides_args(a, b))
        threads = TILED_THREADS
    args = (cupy_module.as_cupy(a), cupy_module.as_cupy(b), cupy_module.as_cupy(out),
            *(np.int64(v) for v in sizes))
    cupy_module.launch(kern, grid, (threads,), args, a.device)
    return out


def _batched(kernel: Callable, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Run a batched kernel on user shapes: broadcast the batch dims, fold them into M when b is 2-D."""
    m, k = a.shape[-2:]
    n = b.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    if k == 0 or m == 0 or n == 0 or 0 in batch:
        return torch.zeros((*batch, m, n), dtype=a.dtype, device=a.device)
    if b.dim() == 2:
        out = kernel(a.reshape(1, -1, k), b.unsqueeze(0))
    else:
        out = kernel(a.expand(*batch, m, k).reshape(-1, m, k), b.expand(*batch, k, n).reshape(-1, k, n))
    return out.view(*batch, m, n)


@torch.library.custom_op("gpuforge::matmul", mutates_args=())
def _matmul_op(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    return _batched(BACKENDS.impl(backend), a, b)


@_matmul_op.register_fake
def _(a, b, backend):
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


def _setup_context(ctx, inputs, output):
    a, b, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.backend = backend


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _matmul_op(grad, b.mT, ctx.backend).sum_to_size(a.shape)
    if ctx.needs_input_grad[1]:
        if b.dim() == 2:  # one GEMM over all rows: (K, batch·M) @ (batch·M, N) sums the batch on the fly
            grad_b = _matmul_op(a.reshape(-1, a.shape[-1]).mT, grad.reshape(-1, grad.shape[-1]), ctx.backend)
        else:
            grad_b = _matmul_op(a.mT, grad, ctx.backend).sum_to_size(b.shape)
    return grad_a, grad_b, None


_matmul_op.register_autograd(_backward, setup_context=_setup_context)


def _check_shapes(a: torch.Tensor, b: torch.Tensor) -> None:
    if b.shape[-2] != a.shape[-1]:
        raise ValueError(f"b: expected shape (..., K={a.shape[-1]}, N) to match a's last dim K={a.shape[-1]} "
                         f"(a has shape {tuple(a.shape)}), got {tuple(b.shape)}")
    try:
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise ValueError(f"b: batch dims {tuple(b.shape[:-2])} do not broadcast with a's batch dims "
                         f"{tuple(a.shape[:-2])}") from None


def matmul(a: torch.Tensor, b: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """a @ b. a: (..., M, K); b: (K, N) or (..., K, N) with batch dims broadcasting against a's.
    float32/float16/bfloat16, same dtype and device, any strides. Returns (batch..., M, N), contiguous."""
    check_tensor(a, "a", min_ndim=2)
    check_tensor(b, "b", min_ndim=2)
    check_same_device(a=a, b=b)
    check_same_dtype(a=a, b=b)
    _check_shapes(a, b)
    return _matmul_op(a, b, BACKENDS.select(backend, a.device))


# Max relative error vs float64 per dtype for K ≤ ~100 (fp32: tf32 on GPU for Triton).
SELFCHECK_TOL = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _forward_and_grads(a, b, grad, fn):
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    out = fn(a, b)
    da, db = torch.autograd.grad(out, (a, b), grad)
    return out.detach(), da, db


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    cases = []
    for dtype, tol in SELFCHECK_TOL.items():
        for batch, m, k, n in ((None, 1, 7, 5), (None, 19, 13, 10), (2, 9, 16, 7)):
            generator = torch.Generator().manual_seed(m * 1000 + k)
            lead = () if batch is None else (batch,)
            a = torch.randn(*lead, m, k, generator=generator).to(device=device, dtype=dtype)
            b = torch.randn(*lead, k, n, generator=generator).to(device=device, dtype=dtype)
            grad = torch.randn(*lead, m, n, generator=generator).to(device=device, dtype=dtype)
            label = f"{str(dtype).removeprefix('torch.')} {tuple(a.shape)}@{tuple(b.shape)} fwd+bwd"
            cases.append(CheckCase(
                "matmul", label,
                run=lambda backend, a=a, b=b, g=grad: _forward_and_grads(
                    a, b, g, lambda x, y: matmul(x, y, backend=backend)),
                reference=lambda a=a, b=b, g=grad: _forward_and_grads(a.double(), b.double(), g.double(),
                                                                      torch.matmul),
                tol=tol, dtype=dtype))
    return cases
