"""gf.softmax: fused, numerically stable softmax over any dim, with a fused backward, on every backend.

The dim is moved last (a view) and each backend works on rows: forward y = exp(x − max) / Σ exp(x − max),
backward dx = y ⊙ (dy − Σ dy⊙y), both in fp32 whatever the input dtype, rounded once on store.

Masks: −inf entries get probability 0. A fully masked row (all −inf) gives NaN in every backend, exactly as
torch.softmax does (0/0: there is no distribution over an empty support); callers that want zeros there should
write `torch.nan_to_num(y, nan=0.0)` or keep one unmasked entry per row.
"""

from __future__ import annotations

import torch

from gpuforge.kernels._selfcheck import CheckCase, outputs_and_grads
from gpuforge.kernels._tensors import as_rows, compute_dtype
from gpuforge.kernels._validate import FLOAT_DTYPES, check_tensor
from gpuforge.kernels.cuda import softmax as cuda_softmax
from gpuforge.kernels.cupy import softmax as cupy_softmax
from gpuforge.kernels.dispatch import Implementation, Limits, OpBackends

# Every backend: forward(x) -> y and backward(dy, y) -> dx on (rows, n) matrices with a contiguous last dim
# (y contiguous); outputs contiguous.


def softmax_reference(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The oracle: torch.softmax computed in fp32 (float64 stays float64), returned in x's dtype."""
    return torch.softmax(x.to(compute_dtype(x.dtype)), dim).to(x.dtype)


def softmax_backward_reference(dy: torch.Tensor, y: torch.Tensor, dim: int = -1) -> torch.Tensor:
    dy32, y32 = dy.to(compute_dtype(y.dtype)), y.to(compute_dtype(y.dtype))
    return (y32 * (dy32 - (dy32 * y32).sum(dim, keepdim=True))).to(y.dtype)


def _triton():
    from gpuforge.kernels.triton import softmax

    return softmax


def _numba():
    from gpuforge.kernels.numba import softmax

    return softmax


REFERENCE = Implementation(forward=lambda x: softmax_reference(x).contiguous(),
                           backward=lambda dy, y: softmax_backward_reference(dy, y).contiguous())
BACKENDS = OpBackends(
    op="softmax",
    loaders={"torch": lambda: REFERENCE, "triton": _triton, "cuda": lambda: cuda_softmax,
             "cupy": lambda: cupy_softmax, "numba": _numba},
    auto_order=("triton", "cuda", "cupy", "numba"),
    limits={"numba": Limits(dtypes=(torch.bfloat16,))},
)


@torch.library.custom_op("gpuforge::softmax", mutates_args=())
def _softmax_op(x: torch.Tensor, backend: str) -> torch.Tensor:
    """Softmax over the last dim; a contiguous result of x's shape. Kernels never see empty tensors."""
    if x.numel() == 0:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    return BACKENDS.impl(backend).forward(as_rows(x)).view(x.shape)


@_softmax_op.register_fake
def _(x, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("gpuforge::softmax_backward", mutates_args=())
def _softmax_backward_op(grad: torch.Tensor, y: torch.Tensor, backend: str) -> torch.Tensor:
    if y.numel() == 0:
        return torch.empty_like(y, memory_format=torch.contiguous_format)
    return BACKENDS.impl(backend).backward(as_rows(grad), as_rows(y.contiguous())).view(y.shape)


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


def softmax(x: torch.Tensor, dim: int = -1, dtype: torch.dtype | None = None, *,
            backend: str = "auto") -> torch.Tensor:
    """Softmax of x over `dim`, fused and numerically stable (exp(x − max) / Σ exp(x − max), fp32 math).

    x: float32/float16/bfloat16, any shape and strides. Returns x's shape and dtype (or `dtype`: x is cast to
    it first, as torch.softmax's dtype argument does); the result is contiguous with `dim` last, i.e. a
    transposed view when dim is not the last dim. −inf entries get probability 0; a row with every entry −inf
    gives NaN, as torch.softmax does. Differentiable (fused backward kernel)."""
    if dtype is not None:
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype: expected None or one of float32/float16/bfloat16, got {dtype}")
        check_tensor(x, "x", dtypes=None)
        x = x.to(dtype)
    check_tensor(x, "x")
    _check_dim(dim, x)
    chosen = BACKENDS.select(backend, x.device, dtype=x.dtype, shape=(x.numel(), x.shape[dim] if x.dim() else 1),
                             run=lambda b: softmax(x, dim, backend=b))
    if x.dim() == 0:
        return _softmax_op(x.reshape(1), chosen).reshape(())
    return _softmax_op(x.movedim(dim, -1), chosen).movedim(-1, dim)


SELFCHECK_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


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
                run=lambda backend, x=x, g=grad, d=dim: outputs_and_grads(
                    lambda t: softmax(t, d, backend=backend), (x,), g),
                reference=lambda x=x, g=grad, d=dim: outputs_and_grads(
                    lambda t: torch.softmax(t, d), (x.double(),), g.double()),
                tol=tol, dtype=dtype))
    return cases
