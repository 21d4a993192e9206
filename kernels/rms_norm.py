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
fake) and autograd, the torch reference, and the CUDA C++ / cupy host glue for csrc/rms_norm.cu.
"""

from __future__ import annotations

import importlib

import torch

from gpuforge.kernels import _alloc, cuda_ext, cupy_module
from gpuforge.kernels._dispatch import OpBackends
from gpuforge.kernels._selfcheck import CheckCase
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_same_shape, check_tensor

# Each impl is a forward(x, weight, residual, eps) -> (y, h | None, rstd) on (rows, n) views; its module holds
# the matching backward under the same name with "backward" for "forward":
# backward(dy, x, weight, rstd, dh, deterministic) -> (dx, dw).
BACKENDS = OpBackends(
    op="rms_norm",
    impls={
        "torch": "gpuforge.kernels.rms_norm:reference_forward",
        "triton": "gpuforge.kernels.triton.rms_norm:rms_norm_forward",
        "cuda": "gpuforge.kernels.rms_norm:cuda_forward",
        "cupy": "gpuforge.kernels.rms_norm:cupy_forward",
    },
    auto_order=("triton", "cuda", "cupy"),
)


def _backward_impl(backend: str):
    module_name, forward_name = BACKENDS.impls[backend].split(":")
    return getattr(importlib.import_module(module_name), forward_name.replace("forward", "backward"))


def reference_forward(x, weight, residual, eps):
    """Plain PyTorch, statistics in fp32 (float64 inputs stay float64: gradcheck runs through this path)."""
    h = x + residual if residual is not None else None
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = (h if h is not None else x).to(acc)
    rstd = torch.rsqrt(xf.square().mean(-1) + eps)
    return (xf * rstd.unsqueeze(-1) * weight.to(acc)).to(x.dtype), h, rstd


def reference_backward(dy, x, weight, rstd, dh, deterministic):
    acc = rstd.dtype
    xhat = x.to(acc) * rstd.unsqueeze(-1)
    g = dy.to(acc) * weight.to(acc)
    dx = rstd.unsqueeze(-1) * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(acc)
    return dx.to(x.dtype), (dy.to(acc) * xhat).sum(0).to(weight.dtype)


def _outputs(x, with_h: bool):
    rows, n = x.shape
    y = _alloc.empty((rows, n), dtype=x.dtype, device=x.device)
    h = _alloc.empty((rows, n), dtype=x.dtype, device=x.device) if with_h else None
    return y, h, _alloc.empty((rows,), dtype=torch.float32, device=x.device)


def _ptr(t: torch.Tensor | None) -> int:
    return t.data_ptr() if t is not None else 0


def _row_stride(t: torch.Tensor | None) -> int:
    return t.stride(0) if t is not None else 0


def cuda_forward(x, weight, residual, eps):
    """csrc/rms_norm.cu through the AOT extension gpuforge._C."""
    rows, n = x.shape
    y, h, rstd = _outputs(x, residual is not None)
    cuda_ext.extension().rms_norm_forward(
        x.data_ptr(), x.stride(0), _ptr(residual), _row_stride(residual), weight.data_ptr(), y.data_ptr(),
        _ptr(h), rstd.data_ptr(), rows, n, float(eps), cuda_ext.dtype_code(x), cuda_ext.stream_handle(x))
    return y, h, rstd


def _backward_outputs(x, weight, programs: int, deterministic: bool):
    rows, n = x.shape
    dx = _alloc.empty((rows, n), dtype=x.dtype, device=x.device)
    dw = _alloc.empty((n,), dtype=weight.dtype, device=x.device)
    partial = _alloc.empty((programs if deterministic else 1, n), dtype=torch.float32, device=x.device)
    if not deterministic or rows == 0:
        partial.zero_()  # the atomic form adds into it; with no rows it is the whole (zero) gradient
    return dx, dw, partial


# The CUDA backward keeps a block's fp32 partial dw row in shared memory: 160 KB fits A100 (163 KB) and H100.
CUDA_MAX_N = 40960
# The Triton kernels keep a whole row in registers (triton/rms_norm.py); wider rows go to torch under `auto`.
TRITON_MAX_N = 65536


def _check_cuda_width(n: int) -> None:
    if n > CUDA_MAX_N:
        raise ValueError(f"x: the cuda/cupy rms_norm backward keeps an fp32 row of dw in shared memory, so "
                         f"the last dim must be ≤ {CUDA_MAX_N}, got {n}; use backend='torch'")


def cuda_backward(dy, x, weight, rstd, dh, deterministic):
    rows, n = x.shape
    _check_cuda_width(n)
    ext = cuda_ext.extension()
    blocks = ext.rms_norm_backward_blocks(rows, x.device.index or 0)
    dx, dw, partial = _backward_outputs(x, weight, blocks, deterministic)
    ext.rms_norm_backward(
        dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), weight.data_ptr(), rstd.data_ptr(), _ptr(dh),
        _row_stride(dh), dx.data_ptr(), dw.data_ptr(), partial.data_ptr(), blocks, rows, n,
        bool(deterministic), cuda_ext.dtype_code(x), cuda_ext.stream_handle(x))
    return dx, dw


# As in csrc/rms_norm.cu: at most 512 threads per row block, backward blocks per SM, column-sum threads.
CUPY_MAX_THREADS = 512
CUPY_BACKWARD_BLOCKS_PER_SM = 2
CUPY_SUM_THREADS = 256


def _threads(n: int, vec: int) -> int:
    """One thread per vec-wide chunk of a row, in whole warps, capped (csrc's rms_norm_threads)."""
    chunks = -(-n // vec)
    return min(CUPY_MAX_THREADS, 32 * max(1, -(-chunks // 32)))


def _vec_width(n: int, element_size: int, *tensors: torch.Tensor | None) -> int:
    """16-byte vectors when every row start is 16-byte aligned (the launchers' rule), else one element."""
    width = 16 // element_size
    aligned = all(t is None or (t.data_ptr() % 16 == 0 and (t.dim() == 1 or t.stride(0) % width == 0))
                  for t in tensors)
    return width if n % width == 0 and aligned else 1


def _cupy_kernel(name: str):
    return cupy_module.kernel("rms_norm.cu", (name,), name)


def cupy_forward(x, weight, residual, eps):
    """The kernels of csrc/rms_norm.cu compiled by NVRTC, launched as the AOT launcher does."""
    import numpy as np

    rows, n = x.shape
    y, h, rstd = _outputs(x, residual is not None)
    if rows == 0:
        return y, h, rstd
    vec = _vec_width(n, x.element_size(), x, residual, weight, y, h)
    kern = _cupy_kernel(f"gpuforge::rms_norm_forward_kernel<{cupy_module.CPP_TYPES[x.dtype]}, {vec}, "
                        f"{str(residual is not None).lower()}>")
    res, h_out = (residual, h) if residual is not None else (x, y)
    args = (cupy_module.as_cupy(x), np.int64(x.stride(0)), cupy_module.as_cupy(res), np.int64(res.stride(0)),
            cupy_module.as_cupy(weight), cupy_module.as_cupy(y), cupy_module.as_cupy(h_out),
            cupy_module.as_cupy(rstd), np.int64(n), np.float32(eps))
    cupy_module.launch(kern, (rows,), (_threads(n, vec),), args, x.device)
    return y, h, rstd


def cupy_backward(dy, x, weight, rstd, dh, deterministic):
    import numpy as np

    rows, n = x.shape
    _check_cuda_width(n)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    programs = max(1, min(rows, sms * CUPY_BACKWARD_BLOCKS_PER_SM))
    dx, dw, partial = _backward_outputs(x, weight, programs, deterministic)
    ctype = cupy_module.CPP_TYPES[x.dtype]
    if rows:
        vec = _vec_width(n, x.element_size(), dy, x, weight, dx, dh)
        kern = _cupy_kernel(f"gpuforge::rms_norm_backward_kernel<{ctype}, {vec}, "
                            f"{str(dh is not None).lower()}, {str(not deterministic).lower()}>")
        smem = n * 4  # the block's fp32 partial dw row
        if smem > 48 * 1024:
            kern.max_dynamic_shared_size_bytes = smem
        dh_arg = dh if dh is not None else dy
        c = cupy_module.as_cupy
        args = (c(dy), np.int64(dy.stride(0)), c(x), np.int64(x.stride(0)), c(weight), c(rstd), c(dh_arg),
                np.int64(dh_arg.stride(0)), c(dx), c(partial), np.int64(rows), np.int64(n))
        cupy_module.launch(kern, (programs,), (_threads(n, vec),), args, x.device, shared_mem=smem)
    column_sum = _cupy_kernel(f"gpuforge::rms_norm_sum_partials_kernel<{ctype}>")
    args = (cupy_module.as_cupy(partial), cupy_module.as_cupy(dw), np.int64(partial.shape[0]), np.int64(n))
    cupy_module.launch(column_sum, (-(-n // CUPY_SUM_THREADS),), (CUPY_SUM_THREADS,), args, x.device)
    return dx, dw


def _as_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """A (rows, n) view with a contiguous last dim (a copy only when the input's last dim is strided)."""
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n == 1 else t2.contiguous()


# --- torch.library ops -------------------------------------------------------------------------------------

@torch.library.custom_op("gpuforge::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float, backend: str,
                 deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    y, _, rstd = BACKENDS.impl(backend)(_as_rows(x, n), weight.contiguous(), None, eps)
    return y.view(x.shape), rstd.view(x.shape[:-1])


@_rms_norm_op.register_fake
def _(x, weight, eps, backend, deterministic):
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=stat)


@torch.library.custom_op("gpuforge::add_rms_norm", mutates_args=())
def _add_rms_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                     backend: str, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    y, h, rstd = BACKENDS.impl(backend)(_as_rows(x, n), weight.contiguous(), _as_rows(residual, n), eps)
    return y.view(x.shape), h.view(x.shape), rstd.view(x.shape[:-1])


@_add_rms_norm_op.register_fake
def _(x, residual, weight, eps, backend, deterministic):
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=stat)


@torch.library.custom_op("gpuforge::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                          dh: torch.Tensor | None, backend: str,
                          deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw) of y = rms_norm(x) · w; `dh` (optional) is a gradient added to dx (the fused residual's h)."""
    n = x.shape[-1]
    dx, dw = _backward_impl(backend)(
        _as_rows(dy, n), _as_rows(x, n), weight.contiguous(), rstd.reshape(-1).contiguous(),
        _as_rows(dh, n) if dh is not None else None, deterministic)
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
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             residual: torch.Tensor | None = None, deterministic: bool = True, backend: str = "auto"):
    """RMSNorm over the last dim: x / sqrt(mean(x², -1) + eps) · weight, statistics in fp32.

    x: (..., n), float32/float16/bfloat16, any strides; weight: (n,), same dtype and device. With
    `residual` (x's shape, dtype, device) it computes h = x + residual first and returns (rms_norm(h), h).
    Autograd for x, weight and residual; `deterministic=False` lets the weight gradient use atomics."""
    _check_inputs(x, weight, eps, residual)
    wide = backend == "auto" and x.shape[-1] > TRITON_MAX_N  # no fused kernel holds the row on chip
    chosen = "torch" if wide else BACKENDS.select(backend, x.device)
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
