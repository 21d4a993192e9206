"""gf.rms_norm: y = x / sqrt(mean(x², last dim) + eps) · weight, with an optional fused residual add.

`gf.rms_norm(x, weight, eps, residual=r)` first forms h = x + r (the residual stream of a pre-norm LLM block),
normalises h and returns the pair (y, h) — one kernel reads x and r once and writes both outputs. Without
`residual` it returns y alone.

Every backend computes the statistics in fp32 (float64 for the torch reference on float64 inputs) and saves
rstd = 1/rms per row for the backward, which gives
    dw = Σ_rows dy · x̂          (x̂ = x · rstd)
    dx = rstd · (g − x̂ · mean(g · x̂))   with g = dy · w, plus the gradient arriving at h for the fused form.
Kernels see 2-D (rows, n) views whose last dim is contiguous (any row stride); the weight gradient is summed
from one fp32 partial row per program in a second pass in fixed order (`deterministic=True`, bit-identical
across runs) or with fp32 atomics (`deterministic=False`).

This module holds the functional API and its checks, the torch.library ops (forward and backward, each with a
fake) and autograd, the torch reference and the backend table.
"""

from __future__ import annotations

import torch

from gpuforge.kernels._selfcheck import CheckCase
from gpuforge.kernels._tensors import as_rows, compute_dtype
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_same_shape, check_tensor
from gpuforge.kernels.cuda import rms_norm as cuda_rms_norm
from gpuforge.kernels.cupy import rms_norm as cupy_rms_norm
from gpuforge.kernels.dispatch import Implementation, Limits, OpBackends

# Every backend, on (rows, n) views whose last dim is contiguous:
#   forward(x, weight, residual, eps) -> (y, h | None, rstd)
#   backward(dy, x, weight, rstd, dh, deterministic) -> (dx, dw)


def reference_forward(x, weight, residual, eps):
    """Plain PyTorch, statistics in fp32 (float64 inputs stay float64: gradcheck runs through this path)."""
    h = x + residual if residual is not None else None
    xf = (h if h is not None else x).to(compute_dtype(x.dtype))
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    return (xf * rstd.unsqueeze(-1) * weight.to(xf.dtype)).to(x.dtype), h, rstd


def reference_backward(dy, x, weight, rstd, dh, deterministic):
    acc = rstd.dtype
    xhat = x.to(acc) * rstd.unsqueeze(-1)
    g = dy.to(acc) * weight.to(acc)
    dx = rstd.unsqueeze(-1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(acc)
    return dx.to(x.dtype), (dy.to(acc) * xhat).sum(0).to(weight.dtype)


def _triton():
    from gpuforge.kernels.triton import rms_norm

    return rms_norm


REFERENCE = Implementation(forward=reference_forward, backward=reference_backward)
# The Triton kernels take any width: rows past what registers hold are looped over column chunks
# (kernels/triton/rms_norm.py). The CUDA backward keeps a block's fp32 partial dw row in shared memory: 160 KB
# fits A100 (163 KB) and H100. `auto` passes over a backend for wider rows.
BACKENDS = OpBackends(
    op="rms_norm",
    loaders={"torch": lambda: REFERENCE, "triton": _triton, "cuda": lambda: cuda_rms_norm,
             "cupy": lambda: cupy_rms_norm},
    auto_order=("triton", "cuda", "cupy"),
    limits={"cuda": Limits(max_width=40960, why="the backward keeps a block's fp32 dw row in shared memory"),
            "cupy": Limits(max_width=40960, why="the backward keeps a block's fp32 dw row in shared memory")},
)


# --- torch.library ops -------------------------------------------------------------------------------------

@torch.library.custom_op("gpuforge::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str,
                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = BACKENDS.impl(backend).forward(as_rows(x), weight.contiguous(), None, eps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@_rms_norm_op.register_fake
def _(x, weight, eps, backend, deterministic):
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=compute_dtype(x.dtype))


@torch.library.custom_op("gpuforge::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     backend: str, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, rstd = BACKENDS.impl(backend).forward(as_rows(x), weight.contiguous(), as_rows(residual), eps)
    return y.view(x.shape), h.view(x.shape), rstd.view(x.shape[:-1])


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, backend, deterministic):
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=compute_dtype(x.dtype))


@torch.library.custom_op("gpuforge::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          dh: torch.Tensor | None, backend: str,
                          deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) of y = rms_norm(x) · w; `dh` (optional) is a gradient added to dx (the fused residual's h)."""
    dx, dw = BACKENDS.impl(backend).backward(
        as_rows(dy), as_rows(x), weight.contiguous(), rstd.reshape(-1).contiguous(),
        as_rows(dh) if dh is not None else None, deterministic)
    return dx.view(x.shape), dw


@_rms_norm_backward_op.register_fake
def _(dy, x, weight, rstd, dh, backend, deterministic):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, eps, backend, deterministic = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.backend, ctx.deterministic = backend, deterministic


def _backward_rms_norm(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    dx, dw = _rms_norm_backward_op(grad_y, x, weight, rstd, None, ctx.backend, ctx.deterministic)
    return dx, dw, None, None, None


_rms_norm_op.register_autograd(_backward_rms_norm, setup_context=_setup_rms_norm)


def _setup_add_rms_norm(ctx, inputs, output):
    x, residual, weight, eps, backend, deterministic = inputs
    ctx.save_for_backward(output[1], weight, output[2])
    ctx.backend, ctx.deterministic = backend, deterministic


def _backward_add_rms_norm(ctx, grad_y, grad_h, grad_rstd):
    h, weight, rstd = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(h)
    dh, dw = _rms_norm_backward_op(grad_y, h, weight, rstd, grad_h, ctx.backend, ctx.deterministic)
    return dh, dh, dw, None, None, None


_add_rms_norm_op.register_autograd(_backward_add_rms_norm, setup_context=_setup_add_rms_norm)


# --- public API --------------------------------------------------------------------------------------------

def _check_inputs(x, weight, eps, residual) -> None:
    check_tensor(x, "x", min_ndim=1)
    check_tensor(weight, "weight")
    check_same_device(x=x, weight=weight)
    check_same_dtype(x=x, weight=weight)
    if x.shape[-1] == 0:
        raise ValueError(f"x: expected a non-empty last dim to normalise over, got shape {tuple(x.shape)}")
    if tuple(weight.shape) != tuple(x.shape[-1:]):
        raise ValueError(f"weight: expected shape {tuple(x.shape[-1:])} (x's last dim; x has shape "
                         f"{tuple(x.shape)}), got {tuple(weight.shape)}")
    if residual is not None:
        check_tensor(residual, "residual")
        check_same_device(x=x, residual=residual)
        check_same_dtype(x=x, residual=residual)
        check_same_shape(x=x, residual=residual)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < float("inf"):
        raise ValueError(f"eps: expected a positive finite float, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             residual: torch.Tensor | None = None, deterministic: bool = True, backend: str = "auto"):
    """RMSNorm over the last dim: x / sqrt(mean(x², -1) + eps) · weight, statistics in fp32.

    x: (..., n), float32/float16/bfloat16, any strides; weight: (n,), same dtype and device. With
    `residual` (x's shape, dtype, device) it computes h = x + residual first and returns (rms_norm(h), h).
    Autograd for x, weight and residual; `deterministic=False` lets the weight gradient use atomics."""
    _check_inputs(x, weight, eps, residual)
    chosen = BACKENDS.select(backend, x.device, dtype=x.dtype, width=x.shape[-1], shape=(x.numel(), x.shape[-1]),
                             run=lambda b: rms_norm(x, weight, eps, residual=residual, deterministic=deterministic,
                                                    backend=b))
    if residual is None:
        return _rms_norm_op(x, weight, float(eps), chosen, bool(deterministic))[0]
    y, h, _ = _add_rms_norm_op(x, residual, weight, float(eps), chosen, bool(deterministic))
    return y, h


def rms_norm_float64(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The oracle of tests and the self-check: the textbook formula in float64."""
    x64 = x.double()
    return x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps) * weight.double()


SELFCHECK_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _check_case(x, weight, residual, dy):
    """float64 outputs: forward (and h), dx, dw (and d residual) through autograd of the formula."""
    leaves = [t.detach().double().requires_grad_() for t in (x, weight)]
    res = residual.detach().double().requires_grad_() if residual is not None else None
    h = leaves[0] + res if res is not None else leaves[0]
    y = rms_norm_float64(h, leaves[1])
    grads = torch.autograd.grad(y, leaves + ([res] if res is not None else []), dy.double())
    return (y.detach(), *grads) if res is None else (y.detach(), h.detach(), *grads)


def _run_case(backend, x, weight, residual, dy):
    leaves = [t.detach().clone().requires_grad_() for t in (x, weight)]
    res = residual.detach().clone().requires_grad_() if residual is not None else None
    out = rms_norm(leaves[0], leaves[1], residual=res, backend=backend)
    y = out if res is None else out[0]
    grads = torch.autograd.grad(y, leaves + ([res] if res is not None else []), dy)
    return (y.detach(), *grads) if res is None else (y.detach(), out[1].detach(), *grads)


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    cases = []
    for dtype, tol in SELFCHECK_TOL.items():
        for rows, n, fused in ((1, 3, False), (3, 130, False), (97, 7, True), (5, 1000, True)):
            generator = torch.Generator().manual_seed(rows * 1000 + n)
            x, dy, r = (torch.randn(rows, n, generator=generator).to(device=device, dtype=dtype)
                        for _ in range(3))
            w = (1 + 0.1 * torch.randn(n, generator=generator)).to(device=device, dtype=dtype)
            r = r if fused else None
            label = f"{str(dtype).removeprefix('torch.')} ({rows}, {n}){' + residual' if fused else ''}"
            cases.append(CheckCase(
                "rms_norm", label,
                run=lambda backend, x=x, w=w, r=r, dy=dy: _run_case(backend, x, w, r, dy),
                reference=lambda x=x, w=w, r=r, dy=dy: _check_case(x, w, r, dy), tol=tol, dtype=dtype))
    return cases
