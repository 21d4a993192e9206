"""flash_attention benchmark: the Triton and CUDA C++ kernels beside torch SDPA's flash backend
(FlashAttention-2 inside PyTorch, the baseline) and its math backend, forward and forward+backward (a backend's
fwd+bwd row times its forward and the backward of the same backend in kernels/flash_attention.py's table).

TFLOP/s counts 4·B·H·Sq·Sk·D for the forward (two GEMMs), halved when causal; the backward is 2.5× the
forward, so a forward+backward row counts 3.5×. The speed targets (H100/H200, bf16, B=4, H=32, D=128,
S=4096, causal and not): forward >= 1.0× SDPA-flash, backward >= 0.8×; the sm_90a kernel (row "cuda-wgmma",
forward only, compute capability 9.0) >= 550 TFLOP/s at D=128, S=8K..16K. `python -m
gpuforge.profiling.bench_flash_attention --memory` prints peak memory of one forward+backward at S = 1K..32K
(it must grow linearly in S).
"""

from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from gpuforge.kernels import backends
from gpuforge.kernels.attention_problem import Problem
from gpuforge.kernels.cuda import flash_attention as cuda_flash_attention
from gpuforge.kernels.flash_attention import attention_math, flash_attention
from gpuforge.profiling.harness import BenchCase


def attention_flops(b: int, h: int, sq: int, sk: int, d: int, causal: bool) -> int:
    flops = 4 * b * h * sq * sk * d
    return flops // 2 if causal else flops


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}[backend_name]

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


def _with_backward(fn):
    """fn(q, k, v, causal) -> (dq, dk, dv): the forward, then its backward for a ones output gradient."""
    def run(q, k, v, causal):
        out = fn(q, k, v, causal)
        return torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    return run


def _wgmma(q, k, v, causal):
    """csrc/flash_attention_wgmma.cu (sm_90a, opt-in in gf.flash_attention), forward only."""
    problem = Problem.dense(q, k, q.shape[-1] ** -0.5, -1, 0 if causal else -1)
    return cuda_flash_attention.forward(q, k, v, problem, wgmma=True)[0]


def _wgmma_runs(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """The Hopper kernel runs: the cuda backend built, a compute capability 9.0 device, fp16/bf16, D 128."""
    return (backends.is_available("cuda")[0] and device.type == "cuda" and dtype != torch.float32
            and head_dim == 128 and torch.cuda.get_device_capability(device) == (9, 0))


def _implementations(device: torch.device, dtype: torch.dtype, head_dim: int, backward: bool) -> dict[str, object]:
    fns = {}
    for name in ("triton", "cuda"):
        if backends.is_available(name)[0] and backends.runs_on(name, device):
            fns[name] = lambda q, k, v, causal, name=name: flash_attention(q, k, v, causal=causal, backend=name)
    if not backward and _wgmma_runs(device, dtype, head_dim):
        fns["cuda-wgmma"] = _wgmma
    if device.type == "cuda":
        fns["SDPA-flash"] = _sdpa("flash")
        fns["SDPA-math"] = _sdpa("math")
    else:
        fns["SDPA-math"] = _sdpa("math")
    return fns


def _shapes(device: torch.device, quick: bool) -> list[tuple[tuple[int, int, int, int], torch.dtype]]:
    """((B, H, S, D), dtype) pairs: the target shape in bf16 (and fp16), the other shapes in bf16 only: each
    (head dim, dtype) autotunes 16 forward and 14 backward configs, which dominates the sweep's time."""
    if device.type != "cuda":
        return [((1, 2, 64, 32), torch.float32)]
    target, long = (4, 32, 4096, 128), (2, 16, 8192, 128)  # the SDPA targets' shape, the 550 TFLOP/s one's
    if quick:
        return [(target, torch.bfloat16), (long, torch.bfloat16)]
    others = [(4, 32, 4096, 64), (8, 16, 2048, 128), long, (1, 16, 16384, 128), (1, 8, 4096, 256)]
    return [(target, torch.bfloat16), (target, torch.float16)] + [(shape, torch.bfloat16) for shape in others]


def _reference(q, k, v, causal: bool, backward: bool):
    """float64 attention, or its (dq, dk, dv) for a ones output gradient, one batch element at a time:
    B4 H32 S4096's whole score matrix is 17 GB in float64."""
    scale = q.shape[-1] ** -0.5
    parts = []
    for i in range(q.shape[0]):
        qi, ki, vi = (t[i:i + 1].detach().requires_grad_(backward) for t in (q, k, v))
        out = attention_math(qi, ki, vi, scale, -1, 0 if causal else -1)[0]
        parts.append(torch.autograd.grad(out, (qi, ki, vi), torch.ones_like(out)) if backward else (out,))
    return tuple(torch.cat(chunks) for chunks in zip(*parts))


def bench_cases(device: torch.device, quick: bool) -> list[BenchCase]:
    baseline = "SDPA-flash" if device.type == "cuda" else "SDPA-math"
    other_baselines = ("SDPA-math",) if device.type == "cuda" else ()
    cases = []
    for (b, h, s, d), dtype in _shapes(device, quick):
        for causal in (False, True):
            for backward in (False, True):
                def make(b=b, h=h, s=s, d=d, dtype=dtype, grad=backward):
                    return tuple(torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=grad)
                                 for _ in range(3))
                impls = _implementations(device, dtype, d, backward)
                if backward:
                    impls = {label: _with_backward(fn) for label, fn in impls.items()}
                fwd_flops = attention_flops(b, h, s, s, d, causal)
                cases.append(BenchCase(
                    op="flash_attention",
                    shape=f"B{b} H{h} S{s} D{d}{' causal' if causal else ''} {'fwd+bwd' if backward else 'fwd'}",
                    dtype=dtype, make_inputs=make,
                    fns={label: (lambda q, k, v, fn=fn, c=causal: fn(q, k, v, c)) for label, fn in impls.items()},
                    baseline=baseline, other_baselines=other_baselines, causal=causal,
                    bytes=(4 if not backward else 8) * b * h * s * d * dtype.itemsize,
                    flops=int(fwd_flops * (3.5 if backward else 1)),
                    reference=lambda q, k, v, c=causal, bwd=backward: _reference(q, k, v, c, bwd),
                    size=s))
    return cases


def peak_memory_sweep(lengths=(1024, 2048, 4096, 8192, 16384, 32768), b=1, h=16, d=128, causal=True,
                      dtype=torch.bfloat16) -> list[tuple[int, float]]:
    """(S, peak MiB above the inputs) for one forward+backward of flash_attention on the current GPU."""
    rows = []
    for s in lengths:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = flash_attention(q, k, v, causal=causal, backend="triton")
        out.backward(torch.ones_like(out))
        torch.cuda.synchronize()
        rows.append((s, (torch.cuda.max_memory_allocated() - base) / 2**20))
        del q, k, v, out
        with contextlib.suppress(RuntimeError):
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", action="store_true", help="peak memory of fwd+bwd at S = 1K..32K (GPU)")
    args = parser.parse_args(argv)
    if args.memory:
        rows = peak_memory_sweep()
        print("S, peak MiB above inputs, MiB per 1K tokens")
        for s, mib in rows:
            print(f"{s}, {mib:.1f}, {mib / (s / 1024):.2f}")


if __name__ == "__main__":
    main()
