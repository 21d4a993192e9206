"""swiglu benchmark: forward, and forward + backward, of every backend beside F.silu(gate) * up (eager) and
torch.compile of it, in GB/s and as a fraction of the measured copy bandwidth.

Bytes are the minimum SwiGLU must move: forward reads gate and up and writes y (3 tensors), backward reads dy,
gate and up and writes both input gradients (5 more)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from gpuforge.kernels.swiglu import BACKENDS, swiglu, swiglu_float64
from gpuforge.profiling.harness import BenchCase


def _eager(gate, up):
    return F.silu(gate) * up


@functools.cache
def _compiled():
    return torch.compile(_eager)


def _forward_fns(device: torch.device, runnable: list[str]) -> dict:
    fns = {"torch": _eager}
    if device.type == "cuda":
        fns["torch.compile"] = lambda gate, up: _compiled()(gate, up)
    return fns | {name: (lambda gate, up, name=name: swiglu(gate, up, backend=name)) for name in runnable}


def _with_backward(forward):
    """fn(gate, up, dy) -> (d gate, d up)."""
    def run(gate, up, dy):
        return torch.autograd.grad(forward(gate, up), (gate, up), dy)
    return run


def _shapes(device: torch.device, quick: bool) -> list[tuple[int, int]]:
    """(tokens, intermediate size): Llama-2-7B's 11008 and Llama-3-8B's 14336."""
    if device.type == "cuda":
        return [(4096, 11008), (16384, 14336)] if quick else [(1024, 11008), (4096, 11008), (16384, 14336)]
    return [(64, 256)] if quick else [(64, 256), (256, 1000)]


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
                return tuple(torch.randn(rows, n, device=device, dtype=dtype) for _ in range(2))

            def make_backward_inputs(rows=rows, n=n, dtype=dtype):
                gate, up = make_forward_inputs(rows, n, dtype)
                return gate.requires_grad_(), up.requires_grad_(), torch.randn_like(gate)

            def reference_backward(gate, up, dy):
                return torch.autograd.grad(swiglu_float64(gate, up), (gate, up), dy)

            cases.append(BenchCase(
                op="swiglu", shape=f"({rows}, {n}) fwd", dtype=dtype, size=rows * n,
                make_inputs=make_forward_inputs, fns=forward, baseline="torch", secondary_baseline=secondary,
                bytes=3 * rows * n * element, reference=swiglu_float64))
            cases.append(BenchCase(
                op="swiglu", shape=f"({rows}, {n}) fwd+bwd", dtype=dtype, size=rows * n,
                make_inputs=make_backward_inputs, fns={k: _with_backward(f) for k, f in forward.items()},
                baseline="torch", secondary_baseline=secondary, bytes=8 * rows * n * element,
                reference=reference_backward))
    return cases
