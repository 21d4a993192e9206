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

from gpuforge.kernels._selfcheck import CheckCase, outputs_and_grads
from gpuforge.kernels._validate import check_tensor
from gpuforge.kernels.cuda import int4_matmul as cuda_int4_matmul
from gpuforge.kernels.cupy import int4_matmul as cupy_int4_matmul
from gpuforge.kernels.dispatch import Implementation, Limits, OpBackends
from gpuforge.kernels.int4_format import SYMMETRIC_ZERO, Int4Weight, dequantize_int4, pack_int4

# Every backend: forward(x (M, K) contiguous, qweight, scales, zeros, group_size) -> contiguous (M, N).

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _dequantize(qweight, scales, zeros, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    return dequantize_int4(Int4Weight(qweight, scales, zeros, group_size, symmetric=False), dtype)


def int4_matmul_reference(x, qweight, scales, zeros, group_size: int) -> torch.Tensor:
    return x @ _dequantize(qweight, scales, zeros, group_size, x.dtype).T


def _triton():
    from gpuforge.kernels.triton import int4_matmul

    return int4_matmul


REFERENCE = Implementation(forward=int4_matmul_reference)
_HALF_ONLY = Limits(dtypes=(torch.float32,))
BACKENDS = OpBackends(
    op="int4_matmul",
    loaders={"torch": lambda: REFERENCE, "triton": _triton, "cuda": lambda: cuda_int4_matmul,
             "cupy": lambda: cupy_int4_matmul},
    auto_order=("cuda", "triton", "cupy"),
    limits={"cuda": _HALF_ONLY, "cupy": _HALF_ONLY},
)


@torch.library.custom_op("gpuforge::int4_matmul", mutates_args=())
def _int4_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, backend: str) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    n = qweight.shape[0]
    if rows.shape[0] == 0 or n == 0:
        return x.new_zeros((*x.shape[:-1], n))
    out = BACKENDS.impl(backend).forward(rows, qweight.contiguous(), scales.contiguous(), zeros.contiguous(),
                                         group_size)
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
    (float32 on the torch and triton backends; on a GPU the Triton dot takes fp32 x as tf32), any strides.
    Differentiable with respect to x."""
    _check(x, qweight)
    chosen = BACKENDS.select(backend, x.device, dtype=x.dtype, shape=(x.numel() // max(x.shape[-1], 1), *qweight.shape),
                             run=lambda b: int4_matmul(x, qweight, backend=b))
    if qweight.in_scales is not None:
        x = (x.float() / qweight.in_scales).to(x.dtype)
    return _int4_matmul_op(x, qweight.qweight, qweight.scales, qweight.zeros, qweight.group_size, chosen)


# Max relative error vs float64 per activation dtype (the float64 reference uses the same int4 weight).
SELFCHECK_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def random_int4_weight(n: int, k: int, group_size: int, *, symmetric: bool, generator: torch.Generator,
                       scale_dtype: torch.dtype = torch.float16) -> Int4Weight:
    """An Int4Weight with uniformly random codes, positive scales and (asymmetric) random zero points: the
    kernels' inputs without a quantizer, for self-checks and tests."""
    group = k if group_size == -1 else group_size
    codes = torch.randint(0, 16, (n, k), generator=generator)
    scales = (0.02 + 0.05 * torch.rand(n, k // group, generator=generator)).to(scale_dtype)
    if symmetric:
        zeros = torch.full((n, k // group), SYMMETRIC_ZERO, dtype=torch.uint8)
    else:
        zeros = torch.randint(0, 16, (n, k // group), generator=generator).to(torch.uint8)
    return Int4Weight(pack_int4(codes), scales, zeros, group, symmetric)


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    cases = []
    for dtype, tol in SELFCHECK_TOL.items():
        for m, n, k, group in ((1, 67, 128, 32), (5, 33, 192, 64), (17, 96, 256, 128), (3, 40, 96, -1)):
            generator = torch.Generator().manual_seed(m * 1000 + n)
            w = random_int4_weight(n, k, group, symmetric=m % 2 == 0, generator=generator).to(device)
            x = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
            grad = torch.randn(m, n, generator=generator).to(device=device, dtype=dtype)
            w64 = dequantize_int4(w, torch.float64)
            label = f"{str(dtype).removeprefix('torch.')} ({m},{k})@int4({n},{k}) g{w.group_size} fwd+bwd"
            cases.append(CheckCase(
                "int4_matmul", label,
                run=lambda backend, x=x, w=w, g=grad: outputs_and_grads(
                    lambda t: int4_matmul(t, w, backend=backend), (x,), g),
                reference=lambda x=x, w64=w64, g=grad: outputs_and_grads(lambda t: t @ w64.T, (x.double(),),
                                                                         g.double()),
                tol=tol, dtype=dtype))
    return cases
