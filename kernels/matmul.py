"""gf.matmul: (..., M, K) @ (K, N), or batched (..., M, K) @ (..., K, N) with broadcast batch dims.

Every backend kernel computes one batched product C[z] = A[z] @ B[z] on (batch, M, K) and (batch, K, N) views
with arbitrary strides (batch stride 0 for a broadcast operand) into a contiguous (batch, M, N) output, with
fp32 accumulation. This module turns user shapes into those views (folding the batch into M when B is a
plain matrix, so it stays one GEMM), validates, registers the torch.library op and its autograd
(dA = dC·Bᵀ, dB = Aᵀ·dC through the same kernels, summed over broadcast batch dims), and holds the torch
reference and the backend table.

Precision: fp32 inputs on a GPU use tf32 tensor cores in the Triton kernel (10-bit mantissa products, fp32
accumulation; relative error ~1e-3, like torch with allow_tf32=True). The CUDA C++ and numba kernels compute
fp32 exactly; the interpreters on a CPU compute fp32 exactly too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gpuforge.kernels._selfcheck import CheckCase, outputs_and_grads
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_tensor
from gpuforge.kernels.cuda import matmul as cuda_matmul
from gpuforge.kernels.cupy import matmul as cupy_matmul
from gpuforge.kernels.dispatch import Implementation, Limits, OpBackends

# Every backend: forward(a (batch, M, K), b (batch, K, N)), any strides -> contiguous (batch, M, N). The
# backward runs the same forward on transposed operands.


def matmul_reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a, b)


def _triton():
    from gpuforge.kernels.triton import matmul

    return matmul


def _numba():
    from gpuforge.kernels.numba import matmul

    return matmul


REFERENCE = Implementation(forward=matmul_reference)
BACKENDS = OpBackends(
    op="matmul",
    loaders={"torch": lambda: REFERENCE, "triton": _triton, "cuda": lambda: cuda_matmul,
             "cupy": lambda: cupy_matmul, "numba": _numba},
    auto_order=("triton", "cuda", "cupy", "numba"),
    limits={"numba": Limits(dtypes=(torch.bfloat16,))},
)


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
    return _batched(BACKENDS.impl(backend).forward, a, b)


@_matmul_op.register_fake
def _(a, b, backend):
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.new_empty((*batch, a.shape[-2], b.shape[-1]))


def _setup_context(ctx, inputs, output):
    a, b, backend = inputs
    ctx.save_for_backward(a, b)
    ctx.backend = backend


def _summed_product(x: torch.Tensor, y: torch.Tensor, shape: torch.Size, backend: str) -> torch.Tensor:
    """x @ y summed down to `shape` (an operand broadcast over batch dims). When the sum over batches is
    needed, the batched product runs on fp32 copies of fp16/bf16 operands (exact: their products fit fp32) and is
    summed in fp32 before one rounding, as a single GEMM with fp32 accumulation would; rounding each batch's
    product to fp16 first gave 4.7x torch's error."""
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    if tuple(batch) + tuple(shape[-2:]) == tuple(shape) or x.dtype == torch.float32:
        return _matmul_op(x, y, backend).sum_to_size(shape)
    wide = _matmul_op(x.float(), y.float(), backend)
    return wide.sum_to_size(shape).to(x.dtype)


def _backward(ctx, grad):
    a, b = ctx.saved_tensors
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = _summed_product(grad, b.mT, a.shape, ctx.backend)
    if ctx.needs_input_grad[1]:
        if b.dim() == 2:  # one GEMM over all rows: (K, batch·M) @ (batch·M, N) sums the batch on the fly
            rows = math.prod(a.shape[:-1])  # reshape(-1, K) cannot infer the rows when K = 0
            grad_b = _matmul_op(a.reshape(rows, a.shape[-1]).mT, grad.reshape(rows, grad.shape[-1]), ctx.backend)
        else:
            grad_b = _summed_product(a.mT, grad, b.shape, ctx.backend)
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
    rows = a.numel() // a.shape[-1] if a.shape[-1] else a.shape[-2]
    chosen = BACKENDS.select(backend, a.device, dtype=a.dtype, shape=(rows, b.shape[-1], a.shape[-1]),
                             run=lambda name: matmul(a, b, backend=name))
    return _matmul_op(a, b, chosen)


# Max relative error vs float64 per dtype for K ≤ ~100 (fp32: tf32 on GPU for Triton).
SELFCHECK_TOL = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 2e-2}


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
                run=lambda backend, a=a, b=b, g=grad: outputs_and_grads(
                    lambda x, y: matmul(x, y, backend=backend), (a, b), g),
                reference=lambda a=a, b=b, g=grad: outputs_and_grads(torch.matmul, (a.double(), b.double()),
                                                                     g.double()),
                tol=tol, dtype=dtype))
    return cases
