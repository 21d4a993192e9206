"""One timing function for GPUs and CPUs.

GPU: CUDA events around each call, warm-up first, the L2 cache flushed before every timed call (a write to a
buffer larger than L2) so inputs come from HBM, median and p20/p80 over many repeats. CPU: perf_counter around
each call, same statistics. Never called at import time (CUDA events need a driver)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    repeats: int


def _summarise(samples_ms: list[float]) -> Timing:
    ordered = sorted(samples_ms)
    # 'inclusive' interpolates between the samples, so min <= p20 <= p80 <= max even with 3 samples (the default
    # 'exclusive' method extrapolates beyond them: p20 < min).
    q = statistics.quantiles(ordered, n=5, method="inclusive") if len(ordered) >= 2 else [ordered[0]] * 4
    return Timing(statistics.median(ordered), ordered[0], q[0], q[3], len(ordered))


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size
    return torch.empty(max(2 * l2_bytes, 1 << 20) // 4, dtype=torch.int32, device=device)


def time_gpu(fn: Callable[[], object], device: torch.device, warmup: int = 5, repeats: int = 50) -> Timing:
    flush = _l2_flush_buffer(device)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for start, end in zip(starts, ends):
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return _summarise([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_cpu(fn: Callable[[], object], warmup: int = 1, repeats: int = 5) -> Timing:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return _summarise(samples)


def time_fn(fn: Callable[[], object], device: torch.device, quick: bool = False) -> Timing:
    if device.type == "cuda":
        return time_gpu(fn, device, warmup=3 if quick else 10, repeats=20 if quick else 100)
    return time_cpu(fn, warmup=1, repeats=3 if quick else 5)
