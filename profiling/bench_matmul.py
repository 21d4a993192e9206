"""matmul benchmark: every backend beside cuBLAS (torch.matmul), TFLOP/s and the fraction of the measured GEMM
peak. The issue's targets are bf16 M=N=K=4096 and 8192 on an H100/H200: Triton >= 90% of cuBLAS, the CUDA C++
fast path >= 75%. fp32 rows run Triton on tf32 tensor cores against cuBLAS in torch's default (full fp32)
precision, so read them as "what tf32 buys", not as a like-for-like race."""

from __future__ import annotations

import torch

import gpuforge as gf
from gpuforge import backends
from gpuforge.kernels.matmul import BACKENDS
from gpuforge.profiling.harness import BenchCase

# The numba kernel is a teaching kernel (fp32 FMAs from shared memory, no tensor cores) and the simulator
# runs a Python thread per CUDA thread: keep it to sizes where it finishes.
NUMBA_MAX_SIZE = {"cuda": 2048, "cpu": 16}


def _sizes_and_dtypes(device: torch.device, quick: bool):
    if device.type == "cuda":
        sizes = [4096, 8192] if quick else [1024, 2048, 4096, 8192]
        return sizes, ((torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32))
    return ([16, 64] if quick else [16, 64, 128]), (torch.float32,)


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    sizes, dtypes = _sizes_and_dtypes(device, quick)
    status = backends.available()
    runnable = [b for b in BACKENDS.impls if b != "torch" and status[b][0] and backends.runs_on(b, device)]
    cases = []
    for dtype in dtypes:
        for n in sizes:
            fns = {"cuBLAS" if device.type == "cuda" else "torch": torch.matmul}
            fns |= {b: (lambda x, y, b=b: gf.matmul(x, y, backend=b)) for b in runnable
                    if BACKENDS.supports(b, dtype) and (b != "numba" or n <= NUMBA_MAX_SIZE[device.type])}
            cases.append(BenchCase(
                op="matmul", shape=f"{n}x{n}x{n}", dtype=dtype, size=n,
                make_inputs=lambda n=n, dtype=dtype: (torch.randn(n, n, device=device, dtype=dtype),
                                                      torch.randn(n, n, device=device, dtype=dtype)),
                fns=fns, baseline=next(iter(fns)), bytes=3 * n * n * torch.finfo(dtype).bits // 8,
                flops=2 * n**3, reference=torch.matmul))
    return cases
