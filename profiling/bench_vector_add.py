"""vector_add benchmark: every backend beside torch's `a + b`, GB/s counting 2 reads + 1 write per element."""

from __future__ import annotations

import torch

from gpuforge.kernels.vector_add import BACKENDS, vector_add
from gpuforge.profiling.harness import BenchCase


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    if device.type == "cuda":
        sizes = [1 << 20, 1 << 24, 1 << 28] if quick else [1 << p for p in range(16, 30, 2)]
        dtypes = (torch.float32, torch.bfloat16, torch.float16)
    else:
        sizes = [1 << 10, 1 << 12] if quick else [1 << 10, 1 << 14, 1 << 18]
        dtypes = (torch.float32,)
    runnable = [b for b in BACKENDS.runnable(device) if b != "torch"]
    cases = []
    for dtype in dtypes:
        for n in sizes:
            fns = {"torch": torch.add}
            fns |= {b: (lambda x, y, b=b: vector_add(x, y, backend=b)) for b in runnable
                    if BACKENDS.supports(b, dtype)}
            cases.append(BenchCase(
                op="vector_add", shape=f"({n},)", dtype=dtype, size=n,
                make_inputs=lambda n=n, dtype=dtype: (torch.randn(n, device=device, dtype=dtype),
                                                      torch.randn(n, device=device, dtype=dtype)),
                fns=fns, baseline="torch", bytes=3 * n * torch.finfo(dtype).bits // 8,
                reference=torch.add))
    return cases
