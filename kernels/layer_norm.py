"""gf.layer_norm: y = (x − mean) / sqrt(var + eps) · weight + bias over the last dim, with an optional fused
residual add; weight and bias are each optional (torch.nn.LayerNorm's elementwise_affine=False / bias=False).

`gf.layer_norm(x, w, b, eps, residual=r)` first forms h = x + r (the residual stream of a pre-norm block),
normalises h and returns the pair (y, h), one kernel reading x and r once and writing both; without `residual`
it returns y alone. var is the biased variance (mean of squared deviations), as torch's.

Every backend computes the statistics in fp32 (float64 for the torch reference on float64 inputs) and saves
mean and rstd = 1/sqrt(var + eps) per row for the backward, which gives, with x̂ = (x − mean)·rstd, g = dy·w:
    dx = rstd · (g − mean(g) − x̂ · mean(g · x̂))   (+ the gradient arriving at h for the fused form)
    dw = Σ_rows dy · x̂,   db = Σ_rows dy.
Kernels see 2-D (rows, n) views whose last dim is contiguous (any row stride). dw and db are summed from one
fp32 partial row per band of rows in a second pass in fixed order (`deterministic=True`, bit-identical across
runs) or with fp32 atomics (`deterministic=False`).

This module holds the functional API and its checks, the torch.library ops (forward and backward, each with a
fake) and autograd, the torch reference and the backend table.
"""

from __future__ import annotations

import torch

from gpuforge.kernels._selfcheck import CheckCase
from gpuforge.kernels._tensors import as_rows, compute_dtype
from gpuforge.kernels._validate import check_same_device, check_same_dtype, check_same_shape, check_tensor
from gpuforge.kernels.dispatch import Implementation, OpBackends

# Every backend, on (rows, n) views whose last dim is contiguous (weight, bias: (n,) or None):
#   forward(x, weight, bias, residual, eps) -> (y, h | None, mean, rstd)
#   backward(dy, x, weight, mean, rstd, dh, deterministic) -> (dx, dw, db)   (dw, db in x's dtype, always)


def reference_forward(x, weight, bias, residual, eps):
    """Plain PyTorch, statistics in fp32 (float64 inputs stay float64: gradcheck runs through this path)."""
    h = x + residual if residual is not None else None
    xf = (h if h is not None else x).to(compute_dtype(x.dtype))
    mean = xf.mean(-1)
    centred = xf - mean.unsqueeze(-1)
    rstd = torch.rsqrt(centred.square().mean(-1) + eps)
    y = centred * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype), h, mean, rstd


def reference_backward(dy, x, weight, mean, rstd, dh, deterministic):
    acc = rstd.dtype
    xhat = (x.to(acc) - mean.unsqueeze(-1)) * rstd.unsqueeze(-1)
    g = dy.to(acc) * weight.to(acc) if weight is not None else dy.to(acc)
    dx = rstd.unsqueeze(-1) * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if dh is not None:
        dx = dx + dh.to(acc)
    return dx.to(x.dtype), (dy.to(acc) * xhat).sum(0).to(x.dtype), dy.to(acc).sum(0).to(x.dtype)


def _triton():
    from gpuforge.kernels.triton import layer_norm

    return layer_norm


REFERENCE = Implementation(forward=reference_forward, backward=reference_backward)
# The Triton kernels stream rows wider than their one-pass limits (16K forward, 8K backward) in chunks, so no
# width limit applies.
BACKENDS = OpBackends(op="layer_norm", loaders={"torch": lambda: REFERENCE, "triton": _triton},
                      auto_order=("triton",))


def _contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.contiguous() if t is not None else None


def _stats_fake(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(x.new_empty(x.shape[:-1], dtype=compute_dtype(x.dtype)) for _ in range(2))


# --- torch.library ops -------------------------------------------------------------------------------------

@torch.library.custom_op("gpuforge::layer_norm", mutates_args=())
def _layer_norm_op(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
                   backend: str, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = BACKENDS.impl(backend).forward(as_rows(x), _contiguous(weight), _contiguous(bias), None, eps)
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, backend, deterministic):
    return (x.new_empty(x.shape), *_stats_fake(x))


@torch.library.custom_op("gpuforge::add_layer_norm", mutates_args=())
def _add_layer_norm_op(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                       bias: torch.Tensor | None, eps: float, backend: str,
                       deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, h, mean, rstd = BACKENDS.impl(backend).forward(as_rows(x), _contiguous(weight), _contiguous(bias),
                                                      as_rows(residual), eps)
    return y.view(x.shape), h.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


@_add_layer_norm_op.register_fake
def _(x, residual, weight, bias, eps, backend, deterministic):
    return (x.new_empty(x.shape), x.new_empty(x.shape), *_stats_fake(x))


@torch.library.custom_op("gpuforge::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
                            rstd: torch.Tensor, dh: torch.Tensor | None, backend: str,
                            deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db) of y = layer_norm(x)·w + b; `dh` (optional) is a gradient added to dx (the fused residual's
    h). dw and db come back even when the forward had no weight or bias."""
    dx, dw, db = BACKENDS.impl(backend).backward(
        as_rows(dy), as_rows(x), _contiguous(weight), mean.reshape(-1).contiguous(), rstd.reshape(-1).contiguous(),
        as_rows(dh) if dh is not None else None, deterministic)
    return dx.view(x.shape), dw, db


@_layer_norm_backward_op.register_fake
def _(dy, x, weight, mean, rstd, dh, backend, deterministic):
    return x.new_empty(x.shape), x.new_empty(x.shape[-1:]), x.new_empty(x.shape[-1:])


def _parameter_grads(has_weight: bool, has_bias: bool, dw, db):
    return (dw if has_weight else None), (db if has_bias else None)


def _setup_layer_norm(ctx, inputs, output):
    x, weight, bias, eps, backend, deterministic = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.has_bias, ctx.backend, ctx.deterministic = bias is not None, backend, deterministic


def _backward_layer_norm(ctx, grad_y, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    dx, dw, db = _layer_norm_backward_op(grad_y, x, weight, mean, rstd, None, ctx.backend, ctx.deterministic)
    return dx, *_parameter_grads(weight is not None, ctx.has_bias, dw, db), None, None, None


_layer_norm_op.register_autograd(_backward_layer_norm, setup_context=_setup_layer_norm)


def _setup_add_layer_norm(ctx, inputs, output):
    x, residual, weight, bias, eps, backend, deterministic = inputs
    ctx.save_for_backward(output[1], weight, output[2], output[3])
    ctx.has_bias, ctx.backend, ctx.deterministic = bias is not None, backend, deterministic


def _backward_add_layer_norm(ctx, grad_y, grad_h, grad_mean, grad_rstd):
    h, weight, mean, rstd = ctx.saved_tensors
    if grad_y is None:
        grad_y = torch.zeros_like(h)
    dh, dw, db = _layer_norm_backward_op(grad_y, h, weight, mean, rstd, grad_h, ctx.backend, ctx.deterministic)
    return dh, dh, *_parameter_grads(weight is not None, ctx.has_bias, dw, db), None, None, None


_add_layer_norm_op.register_autograd(_backward_add_layer_norm, setup_context=_setup_add_layer_norm)


# --- public API --------------------------------------------------------------------------------------------

def _check_parameter(t, name: str, x: torch.Tensor) -> None:
    if t is None:
        return
    check_tensor(t, name)
    check_same_device(x=x, **{name: t})
    check_same_dtype(x=x, **{name: t})
    if tuple(t.shape) != tuple(x.shape[-1:]):
        raise ValueError(f"{name}: expected shape {tuple(x.shape[-1:])} (x's last dim; x has shape "
                         f"{tuple(x.shape)}), got {tuple(t.shape)}")


def _check_inputs(x, weight, bias, eps, residual) -> None:
    check_tensor(x, "x", min_ndim=1)
    if x.shape[-1] == 0:
        raise ValueError(f"x: expected a non-empty last dim to normalise over, got shape {tuple(x.shape)}")
    _check_parameter(weight, "weight", x)
    _check_parameter(bias, "bias", x)
    if residual is not None:
        check_tensor(residual, "residual")
        check_same_device(x=x, residual=residual)
        check_same_dtype(x=x, residual=residual)
        check_same_shape(x=x, residual=residual)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not 0 < eps < float("inf"):
        raise ValueError(f"eps: expected a positive finite float, got {eps!r}")


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
               eps: float = 1e-5, *, residual: torch.Tensor | None = None, deterministic: bool = True,
               backend: str = "auto"):
    """LayerNorm over the last dim: (x − mean(x)) / sqrt(var(x) + eps) · weight + bias, statistics in fp32.

    x: (..., n), float32/float16/bfloat16, any strides; weight, bias: (n,) or None, x's dtype and device. With
    `residual` (x's shape, dtype, device) it computes h = x + residual first and returns (layer_norm(h), h).
    Autograd for x, weight, bias and residual; `deterministic=False` lets dw/db use atomics."""
    _check_inputs(x, weight, bias, eps, residual)
    chosen = BACKENDS.select(backend, x.device, dtype=x.dtype, width=x.shape[-1], shape=(x.numel(), x.shape[-1]),
                             run=lambda b: layer_norm(x, weight, bias, eps, residual=residual,
                                                      deterministic=deterministic, backend=b))
    if residual is None:
        return _layer_norm_op(x, weight, bias, float(eps), chosen, bool(deterministic))[0]
    y, h, _, _ = _add_layer_norm_op(x, residual, weight, bias, float(eps), chosen, bool(deterministic))
    return y, h


def layer_norm_float64(x: torch.Tensor, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       eps: float = 1e-5) -> torch.Tensor:
    """The oracle of tests and the self-check: torch's layer_norm in float64."""
    return torch.nn.functional.layer_norm(x.double(), x.shape[-1:], weight.double() if weight is not None else None,
                                          bias.double() if bias is not None else None, eps)


SELFCHECK_TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _outputs(fn, x, weight, bias, residual, dy):
    """(y, [h], dx, [dw], [db], [d residual]) from fn(x, weight, bias, residual) -> y or (y, h), fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
    out = fn(*leaves)
    y, h = (out, None) if residual is None else out
    wrt = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, wrt, dy)
    return tuple(t.detach() for t in (y, h) if t is not None) + grads


def _float64_case(x, weight, bias, residual, dy):
    def fn(x, w, b, r):
        h = x + r if r is not None else x
        y = layer_norm_float64(h, w, b)
        return y if r is None else (y, h)

    double = [t.double() if t is not None else None for t in (x, weight, bias, residual)]
    return _outputs(fn, *double, dy.double())


def selfcheck_cases(device: torch.device) -> list[CheckCase]:
    cases = []
    for dtype, tol in SELFCHECK_TOL.items():
        for rows, n, affine, fused in ((1, 3, "wb", False), (3, 130, "w", False), (97, 7, "", True),
                                       (5, 1000, "wb", True)):
            generator = torch.Generator().manual_seed(rows * 1000 + n)
            x, dy, r = (torch.randn(rows, n, generator=generator).to(device=device, dtype=dtype)
                        for _ in range(3))
            w = (1 + 0.1 * torch.randn(n, generator=generator)).to(device=device, dtype=dtype) \
                if "w" in affine else None
            b = (0.1 * torch.randn(n, generator=generator)).to(device=device, dtype=dtype) if "b" in affine else None
            r = r if fused else None
            label = (f"{str(dtype).removeprefix('torch.')} ({rows}, {n}) {affine or 'no affine'}"
                     f"{' + residual' if fused else ''}")
            cases.append(CheckCase(
                "layer_norm", label,
                run=lambda backend, x=x, w=w, b=b, r=r, dy=dy: _outputs(
                    lambda *t: layer_norm(t[0], t[1], t[2], residual=t[3], backend=backend), x, w, b, r, dy),
                reference=lambda x=x, w=w, b=b, r=r, dy=dy: _float64_case(x, w, b, r, dy), tol=tol, dtype=dtype))
    return cases
