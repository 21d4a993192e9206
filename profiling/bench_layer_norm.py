"""layer_norm benchmark: forward, and forward + backward, of every backend beside torch.nn.functional.layer_norm
(eager) and torch.compile of the reference formula, in GB/s and as a fraction of the measured copy bandwidth.

Bytes are the minimum a LayerNorm must move: forward reads x and writes y (2 row-matrices), backward reads dy and
x and writes dx (3 more); weight, bias, the statistics and the partial dw/db rows are a row or a column each and
are left out. The widest GPU shape (262144) runs the streamed (Welford / two-kernel) path."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from gpuforge.kernels.layer_norm import BACKENDS, layer_norm, layer_norm_float64
from gpuforge.profiling.harness import BenchCase

EPS = 1e-5


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    centred = xf - mean
    return (centred * torch.rsqrt(centred.square().mean(-1, keepdim=True) + EPS) * w.float() + b.float()).to(x.dtype)


@functools.cache
def _compiled_reference():
    return torch.compile(_reference)


def _forward_fns(device: torch.device, runnable: list[str]) -> dict:
    fns = {"torch": lambda x, w, b: F.layer_norm(x, x.shape[-1:], w, b, EPS)}
    if device.type == "cuda":
        fns["torch.compile"] = lambda x, w, b: _compiled_reference()(x, w, b)
    return fns | {name: (lambda x, w, b, name=name: layer_norm(x, w, b, EPS, backend=name)) for name in runnable}


def _with_backward(forward):
    """fn(x, w, b, dy) -> (dx, dw, db): the forward, then the backward for x, w and b."""
    def run(x, w, b, dy):
        return torch.autograd.grad(forward(x, w, b), (x, w, b), dy)
    return run


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    if device.type == "cuda":
        full = [(4096, 1024), (4096, 4096), (16384, 8192), (8192, 16384), (64, 262144)]
        return [(4096, 4096), (16384, 8192)] if quick else full
    return [(32, 256)] if quick else [(32, 256), (256, 1024)]


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    runnable = [b for b in BACKENDS.runnable(device) if b != "torch"]
    dtypes = (torch.bfloat16,) if device.type == "cuda" else (torch.float32,)
    if device.type == "cuda" and not quick:
        dtypes += (torch.float16, torch.float32)
    secondary = "torch.compile" if device.type == "cuda" else None
    cases = []
    for dtype in dtypes:
        for rows, n in _shapes(device, quick):
            element = torch.finfo(dtype).bits // 8
            forward = _forward_fns(device, runnable)

            def make_forward_inputs(rows=rows, n=n, dtype=dtype):
                return (torch.randn(rows, n, device=device, dtype=dtype),
                        1 + 0.1 * torch.randn(n, device=device, dtype=dtype),
                        0.1 * torch.randn(n, device=device, dtype=dtype))

            def make_backward_inputs(rows=rows, n=n, dtype=dtype):
                x, w, b = make_forward_inputs(rows, n, dtype)
                return x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), torch.randn_like(x)

            def reference_backward(x, w, b, dy):
                return torch.autograd.grad(layer_norm_float64(x, w, b, EPS), (x, w, b), dy)

            cases.append(BenchCase(
                op="layer_norm", shape=f"({rows}, {n}) fwd", dtype=dtype, size=rows * n,
                make_inputs=make_forward_inputs, fns=forward, baseline="torch", secondary_baseline=secondary,
                bytes=2 * rows * n * element, reference=lambda x, w, b: layer_norm_float64(x, w, b, EPS)))
            cases.append(BenchCase(
                op="layer_norm", shape=f"({rows}, {n}) fwd+bwd", dtype=dtype, size=rows * n,
                make_inputs=make_backward_inputs, fns={k: _with_backward(f) for k, f in forward.items()},
                baseline="torch", secondary_baseline=secondary, bytes=5 * rows * n * element,
                reference=reference_backward))
    return cases
