"""rms_norm benchmark: forward, and forward + backward, of every backend beside torch.nn.functional.rms_norm
(eager) and torch.compile of the reference formula, in GB/s and as a fraction of the measured copy bandwidth.

The speed targets are bf16 4096×4096 and 16384×8192 forward + backward on an H100/H200: ≥ 1.3× torch eager,
≥ 1.0× torch.compile, ≥ 80% of bandwidth. Bytes are the minimum an RMSNorm must move: forward reads x and
writes y (2 row-matrices), backward reads dy and x and writes dx (3 more); weight, rstd and the partial dw
rows are a row or a column each and are left out."""

from __future__ import annotations

import functools

import torch

from gpuforge.kernels.rms_norm import BACKENDS, rms_norm, rms_norm_float64
from gpuforge.profiling.harness import BenchCase

EPS = 1e-6


def _reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + EPS) * w.float()).to(x.dtype)


@functools.cache
def _compiled_reference():
    return torch.compile(_reference)


def _torch_eager(x, w):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],), w, EPS)


def _forward_fns(device: torch.device, runnable: list[str]) -> dict:
    fns = {"torch": _torch_eager}
    if device.type == "cuda":
        fns["torch.compile"] = lambda x, w: _compiled_reference()(x, w)
    return fns | {b: (lambda x, w, b=b: rms_norm(x, w, EPS, backend=b)) for b in runnable}


def _with_backward(forward):
    """fn(x, w, dy) -> (dx, dw): the forward, then the backward for x and w."""
    def run(x, w, dy):
        return torch.autograd.grad(forward(x, w), (x, w), dy)
    return run


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    if device.type == "cuda":
        full = [(4096, 1024), (4096, 4096), (16384, 8192), (8192, 16384)]
        return [(4096, 4096), (16384, 8192)] if quick else full
    return [(32, 256)] if quick else [(32, 256), (256, 1024)]


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    runnable = [b for b in BACKENDS.runnable(device) if b != "torch"]
    dtypes = (torch.bfloat16,)
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
                        1 + 0.1 * torch.randn(n, device=device, dtype=dtype))

            def make_backward_inputs(rows=rows, n=n, dtype=dtype):
                x, w = make_forward_inputs(rows, n, dtype)
                dy = torch.randn(rows, n, device=device, dtype=dtype)
                return x.requires_grad_(), w.requires_grad_(), dy

            def reference_backward(x, w, dy):
                return torch.autograd.grad(rms_norm_float64(x, w, EPS), (x, w), dy)

            cases.append(BenchCase(
                op="rms_norm", shape=f"({rows}, {n}) fwd", dtype=dtype, size=rows * n,
                make_inputs=make_forward_inputs, fns=forward, baseline="torch", secondary_baseline=secondary,
                bytes=2 * rows * n * element, reference=lambda x, w: rms_norm_float64(x, w, EPS)))
            cases.append(BenchCase(
                op="rms_norm", shape=f"({rows}, {n}) fwd+bwd", dtype=dtype, size=rows * n,
                make_inputs=make_backward_inputs, fns={k: _with_backward(f) for k, f in forward.items()},
                baseline="torch", secondary_baseline=secondary, bytes=5 * rows * n * element,
                reference=reference_backward))
    return cases
