"""gf.softmax: fused, numerically stable softmax over any dim, with a fused backward, on every backend.

The dim is moved last (a view) and each backend works on rows: forward y = exp(x − max) / Σ exp(x − max),
backward dx = y ⊙ (dy − Σ dy⊙y), both in fp32 whatever the input dtype, rounded once on store.

Masks: −inf entries get probability 0. A fully masked row (all −inf) gives NaN in every backend, exactly as
torch.softmax does (0/0: there is no distribution over an empty support); callers that want zeros there should
write `torch.nan_to_num(y, nan=0.0)` or keep one unmasked entry per row.
"""

from __future__ import annotations

import torch

from gpuforge.kernels import _alloc, cuda_ext, cupy_module
from gpuforge.kernels._dispatch import OpBackends
from gpuforge.kernels._selfcheck import CheckCase
from gpuforge.kernels._validate import check_tensor

_IMPLS = {
    "torch": "gpuforge.kernels.softmax:torch_{}",
    "triton": "gpuforge.kernels.triton.softmax:{}",
    "cuda": "gpuforge.kernels.softmax:{}_cuda",
    "cupy": "gpuforge.kernels.softmax:{}_cupy",
    "numba": "gpuforge.kernels.numba.softmax:{}",
}
_AUTO_ORDER = ("triton", "cuda", "cupy", "numba")
_NO_BF16 = {"numba": (torch.bfloat16,)}

# Forward implementations: fn(x) -> y over x's last dim, y contiguous with x's shape.
BACKENDS = OpBackends("softmax", {b: s.format("softmax_forward") for b, s in _IMPLS.items()}, _AUTO_ORDER,
                      _NO_BF16)
# Backward implementations: fn(dy, y) -> dx over the last dim, dx contiguous.
BACKWARD = OpBackends("softmax_backward", {b: s.format("softmax_backward") for b, s in _IMPLS.items()},
                      _AUTO_ORDER, _NO_BF16)


def softmax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The oracle: torch.softmax computed in fp32 (float64 stays float64), returned in x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.softmax(x.to(compute), dim).to(x.dtype)


def softmax_backward_reference(dy: torch.Tensor, y: torch.Tensor, dim: int = -1) -> torch.Tensor:
    compute = torch.float64 if y.dtype == torch.float64 else torch.float32
    dy32, y32 = dy.to(compute), y.to(compute)
    return (y32 * (dy32 - (dy32 * y32).sum(dim, keepdim=True))).to(y.dtype)


def torch_softmax_forward(x: torch.Tensor) -> torch.Tensor:
    return softmax_reference(x).contiguous()


def torch_softmax_backward(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return softmax_backward_reference(dy, y).contiguous()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """(…, n) as a (rows, n) matrix with a contiguous last dim: a view when the layout allows, else a copy."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def softmax_forward_cuda(x: torch.Tensor) -> torch.Tensor:
    y = _alloc.empty_like(x)
    x2 = as_rows(x)
    cuda_ext.extension().softmax_forward(x2.data_ptr(), x2.stride(0), y.data_ptr(), x2.shape[0], x2.shape[1],
                                         cuda_ext.dtype_code(x), cuda_ext.stream_handle(x))
    return y


def softmax_backward_cuda(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.contiguous()
    dx = _alloc.empty_like(y)
    dy2 = as_rows(dy)
    cuda_ext.extension().softmax_backward(dy2.data_ptr(), dy2.stride(0), y.data_ptr(), dx.data_ptr(),
                                          dy2.shape[0], dy2.shape[1], cuda_ext.dtype_code(y),
                                          cuda_ext.stream_handle(y))
    return dx


# The cupy backend mirrors launch_softmax_* in csrc/softmax.cu: same kernels, same choice by row length.
CUPY_WARPS_PER_BLOCK = 4  # kWarpsPerBlock: rows per block of the warp kernel
CUPY_BLOCK_THREADS = 512  # kRowBlockThreads
CUPY_MAX_CHUNKS = {"warp": 8, "fwd": 8, "bwd": 4}  # kMaxWarpChunks, kMaxBlockChunksFwd, kMaxBlockChunksBwd


def cupy_plan(kind: str, dtype: torch.dtype, n: int, vectorized: bool) -> tuple[str, int, int]:
    """(kernel name, threads per block, rows per block) for rows of n elements, as the C++ launcher chooses:
    one row per warp while n fits 8 chunks per lane, else one row per block, cached in registers while n fits
    the block's chunks, streamed (chunks = 0) beyond."""
    ctype = cupy_module.CPP_TYPES[dtype]
    vec = 16 // _ELEMENT_SIZE[dtype] if vectorized else 1
    chunk_counts = (1, 2, 4, 8)
    if n <= 32 * CUPY_MAX_CHUNKS["warp"] * vec:
        chunks = next(c for c in chunk_counts if n <= 32 * c * vec)
        return (f"gpuforge::softmax_{kind}_warp_kernel<{ctype}, {chunks}, {vec}>", 32 * CUPY_WARPS_PER_BLOCK,
                CUPY_WARPS_PER_BLOCK)
    fitting = [c for c in chunk_counts if c <= CUPY_MAX_CHUNKS[kind] and n <= CUPY_BLOCK_THREADS * c * vec]
    chunks = fitting[0] if fitting else 0
    return f"gpuforge::softmax_{kind}_block_kernel<{ctype}, {chunks}, {vec}>", CUPY_BLOCK_THREADS, 1


_ELEMENT_SIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _cupy_launch(kind: str, tensors: tuple[torch.Tensor, ...], row_stride: int) -> None:
    """Launch the forward ("fwd": x, y) or backward ("bwd": dy, y, dx) kernel; the first tensor is a (rows, n)
    matrix with row stride `row_stride`, the others contiguous."""
    import numpy as np

    rows, n = tensors[0].shape
    vec = 16 // _ELEMENT_SIZE[tensors[0].dtype]
    vectorized = all(t.data_ptr() % 16 == 0 for t in tensors) and row_stride % vec == 0 and n % vec == 0
    name, threads, rows_per_block = cupy_plan(kind, tensors[0].dtype, n, vectorized)
    kern = cupy_module.kernel("softmax.cu", (name,), name)
    first, *rest = (cupy_module.as_cupy(t) for t in tensors)
    args = (first, np.int64(row_stride), *rest, np.int64(rows), np.int64(n))
    cupy_module.launch(kern, (-(-rows // rows_per_block),), (threads,), args, tensors[0].device)


def softmax_forward_cupy(x: torch.Tensor) -> torch.Tensor:
    y = _alloc.empty_like(x)
    x2 = as_rows(x)
    _cupy_launch("fwd", (x2, y), x2.stride(0))
    return y


def softmax_backward_cupy(dy: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    y = y.contiguous()
    dx = _alloc.empty_like(y)
    dy2 = as_rows(dy)
    _cupy_launch("bwd", (dy2, y, dx), dy2.stride(0))
    return dx


@torch.library.custom_op("gpuforge::softmax", mutates_args=())
def _softmax_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    """Softmax over the last dim; a contiguous result of x's shape. Kernels never see empty tensors."""
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return BACKENDS.impl(backend)(x)


@_softmax_op.register_fake
def _(x, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("gpuforge::softmax_backward", mutates_args=())
def _softmax_backward_op(grad: torch.Tensor, y: torch.Tensor, backend: str) -> torch.Tensor:
    if y.numel() == 0:
        return torch.empty_like(y, memory_format=torch.contiguous_format)
    return BACKWARD.impl(backend)(grad, y)


@_softmax_backward_op.register_fake
def _(grad, y, backend):
    return torch.empty_like(y, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.backend = inputs[1]
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (y,) = ctx.saved_tensors
    return _softmax_backward_op(grad, y, ctx.backend), None


_softmax_op.register_autograd(_backward, setup_context=_setup_context)


def _check_dim(dim, x: torch.Tensor) -> None:
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"dim: expected an int, got {type(dim).__name__}")
    ndim = max(x.dim(), 1)
    if not -ndim <= dim < ndim:
        raise ValueError(f"dim: expected a dim in [{-ndim}, {ndim - 1}] for x of shape {tuple(x.shape)}, "
                         f"got {dim}")


def softmax(x: torch.Tensor, dim: int = -1, *, backend: str = "auto") -> torch.Tensor:
    """Softmax of x over `dim`, fused and numerically stable (exp(x − max) / Σ exp(x − max), fp32 math).

    x: float32/float16/bfloat16, any shape and strides. Returns x's shape and dtype; the result is contiguous
    with `dim` last, i.e. a transposed view when dim is not the last dim. −inf entries get probability 0; a
    row with every entry −inf gives NaN, as torch.softmax does. Differentiable (fused backward kernel)."""
    check_tensor(x, "x")
    _check_dim(dim, x)
    chosen = BACKENDS.select(backend, x.device)
    if x.dim() == 0:
        return _softmax_op(x.reshape(1), chosen).reshape(())
    return _softmax_op(x.movedim(dim, -1), chosen).movedim(-1, dim)


SELFCHECK_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _forward_and_grad(x: torch.Tensor, grad: torch.Tensor, fn):
    x = x.detach().requires_grad_()
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    return y.detach(), dx


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    cases = []
    for dtype, tol in SELFCHECK_TOL.items():
        for shape, dim in (((1, 1), -1), ((3, 97), -1), ((130, 5), 0), ((2, 9, 4), 1)):
            generator = torch.Generator().manual_seed(shape[-1] * 31 + len(shape))
            x = (3 * torch.randn(shape, generator=generator)).to(device=device, dtype=dtype)
            grad = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
            label = f"{str(dtype).removeprefix('torch.')} {shape} dim={dim} fwd+bwd"
            cases.append(CheckCase(
                "softmax", label,
                run=lambda backend, x=x, g=grad, d=dim: _forward_and_grad(
                    x, g, lambda t: softmax(t, d, backend=backend)),
                reference=lambda x=x, g=grad, d=dim: _forward_and_grad(
                    x.double(), g.double(), lambda t: torch.softmax(t, d)),
                tol=tol, dtype=dtype))
    return cases
