"""softmax benchmark: forward, and forward + backward, of every backend beside torch.softmax (eager) and
torch.compile of the reference, in GB/s and as a fraction of the measured copy bandwidth.

The speed target is fp16/bf16 4096×(1K..32K) on an H100/H200: ≥ 85% of the copy bandwidth and ≥ 1.0×
torch.softmax. Bytes are the minimum a softmax must move: the forward reads x and writes y (2 matrices), the
backward reads dy and y and writes dx (3 more)."""

from __future__ import annotations

import functools

import torch

from gpuforge.kernels.softmax import BACKENDS, softmax, softmax_reference
from gpuforge.profiling.harness import BenchCase

# The numba simulator runs a Python thread per CUDA thread: on a CPU, numba gets the tiny shapes only.
NUMBA_MAX_ELEMENTS = {"cuda": 1 << 40, "cpu": 512}


@functools.cache
def _compiled_reference():
    return torch.compile(softmax_reference)


def _forward_fns(device: torch.device, runnable: list[str], elements: int, dtype: torch.dtype) -> dict:
    fns = {"torch": lambda x: torch.softmax(x, -1)}
    if device.type == "cuda":
        fns["torch.compile"] = lambda x: _compiled_reference()(x)
    return fns | {b: (lambda x, b=b: softmax(x, backend=b)) for b in runnable
                  if BACKENDS.supports(b, dtype) and (b != "numba" or elements <= NUMBA_MAX_ELEMENTS[device.type])}


def _with_backward(forward):
    """fn(x, dy) -> dx: the forward, then the backward."""
    def run(x, dy):
        return torch.autograd.grad(forward(x), x, dy)[0]
    return run


def _reference_backward(x, dy):
    return torch.autograd.grad(torch.softmax(x, -1), x, dy)[0]


def _shapes_and_dtypes(device: torch.device, quick: bool):
    if device.type == "cuda":
        lengths = [1024, 8192, 32768] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
        return [(4096, n) for n in lengths], (torch.float16, torch.bfloat16) if quick else \
            (torch.float16, torch.bfloat16, torch.float32)
    return ([(8, 64)] if quick else [(8, 64), (64, 1000)]), (torch.float32,)


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    runnable = [b for b in BACKENDS.runnable(device) if b != "torch"]
    shapes, dtypes = _shapes_and_dtypes(device, quick)
    secondary = "torch.compile" if device.type == "cuda" else None
    cases = []
    for dtype in dtypes:
        for rows, n in shapes:
            element = torch.finfo(dtype).bits // 8
            forward = _forward_fns(device, runnable, rows * n, dtype)

            def make_forward_inputs(rows=rows, n=n, dtype=dtype):
                return (4 * torch.randn(rows, n, device=device)).to(dtype),

            def make_backward_inputs(rows=rows, n=n, dtype=dtype):
                (x,) = make_forward_inputs(rows, n, dtype)
                return x.requires_grad_(), torch.randn(rows, n, device=device, dtype=dtype)

            cases.append(BenchCase(
                op="softmax", shape=f"({rows}, {n}) fwd", dtype=dtype, size=rows * n,
                make_inputs=make_forward_inputs, fns=forward, baseline="torch", secondary_baseline=secondary,
                bytes=2 * rows * n * element, reference=lambda x: torch.softmax(x, -1)))
            cases.append(BenchCase(
                op="softmax", shape=f"({rows}, {n}) fwd+bwd", dtype=dtype, size=rows * n,
                make_inputs=make_backward_inputs, fns={k: _with_backward(f) for k, f in forward.items()},
                baseline="torch", secondary_baseline=secondary, bytes=5 * rows * n * element,
                reference=_reference_backward))
    return cases
