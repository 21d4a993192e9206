"""matmul benchmark: every backend beside cuBLAS (torch.matmul), TFLOP/s and the fraction of the measured GEMM
peak. The speed targets are bf16 M=N=K=4096 and 8192 on an H100/H200: Triton >= 90% of cuBLAS, the CUDA C++
fast path >= 75%, the sm_90a wgmma kernel (row "cuda-wgmma", forward only) >= 90%. fp32 rows run Triton on tf32
tensor cores against cuBLAS in torch's default (full fp32) precision, so read them as "what tf32 buys", not as a
like-for-like race. Forward+backward rows time the forward and the gradients of both operands (three GEMMs,
6·n³ FLOP)."""

from __future__ import annotations

import torch

from gpuforge.kernels.cuda import matmul as cuda_matmul
from gpuforge.kernels.matmul import BACKENDS, matmul
from gpuforge.profiling.harness import BenchCase

# The numba kernel is a teaching kernel (fp32 FMAs from shared memory, no tensor cores) and the simulator
# runs a Python thread per CUDA thread: keep it to sizes where it finishes.
NUMBA_MAX_SIZE = {"cuda": 2048, "cpu": 16}


def _sizes_and_dtypes(device: torch.device, quick: bool):
    if device.type == "cuda":
        sizes = [4096, 8192] if quick else [1024, 2048, 4096, 8192]
        return sizes, ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32))
    return ([16, 64] if quick else [16, 64, 128]), (torch.float32,)


def _backward_sizes(device: torch.device, quick: bool) -> list[int]:
    if device.type == "cuda":
        return [4096] if quick else [4096, 8192]
    return [64]


def _wgmma_runs(device: torch.device, dtype: torch.dtype, runnable: list[str]) -> bool:
    """The sm_90a wgmma kernel runs: the cuda backend built, a compute capability 9.0 device, 16-bit operands."""
    return ("cuda" in runnable and dtype != torch.float32 and device.type == "cuda"
            and torch.cuda.get_device_capability(device) == (9, 0))


def _with_backward(fn):
    """fn(a, b, dc) -> (da, db): the forward, then the gradients of both operands."""
    def run(a, b, dc):
        return torch.autograd.grad(fn(a, b), (a, b), dc)
    return run


def _reference_backward(a, b, dc):
    return torch.autograd.grad(a @ b, (a, b), dc)


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    sizes, dtypes = _sizes_and_dtypes(device, quick)
    runnable = [b for b in BACKENDS.runnable(device) if b != "torch"]
    baseline = "cuBLAS" if device.type == "cuda" else "torch"
    cases = []
    for dtype in dtypes:
        element = torch.finfo(dtype).bits // 8

        def operands(n, dtype=dtype, grad=False):
            return tuple(torch.randn(n, n, device=device, dtype=dtype, requires_grad=grad) for _ in range(2))

        for n in sizes:
            fns = {baseline: torch.matmul}
            fns |= {b: (lambda x, y, b=b: matmul(x, y, backend=b)) for b in runnable
                    if BACKENDS.supports(b, dtype) and (b != "numba" or n <= NUMBA_MAX_SIZE[device.type])}
            if _wgmma_runs(device, dtype, runnable):  # csrc/matmul_wgmma.cu, opt-in in gf.matmul
                fns["cuda-wgmma"] = lambda x, y: cuda_matmul.forward(x[None], y[None], wgmma=True)[0]
            cases.append(BenchCase(
                op="matmul", shape=f"{n}x{n}x{n} fwd", dtype=dtype, size=n,
                make_inputs=lambda n=n: operands(n), fns=fns, baseline=baseline, bytes=3 * n * n * element,
                flops=2 * n**3, reference=torch.matmul))
            if n in _backward_sizes(device, quick):
                cases.append(BenchCase(
                    op="matmul", shape=f"{n}x{n}x{n} fwd+bwd", dtype=dtype, size=n,
                    make_inputs=lambda n=n, dtype=dtype: (*operands(n, grad=True),
                                                          torch.randn(n, n, device=device, dtype=dtype)),
                    fns={label: _with_backward(fn) for label, fn in fns.items() if label != "cuda-wgmma"},
                    baseline=baseline,
                    bytes=9 * n * n * element, flops=6 * n**3, reference=_reference_backward))
    return cases
