"""Benchmark protocol and runner. `profiling/bench_<op>.py` modules define `bench_cases(device, quick)`
returning BenchCase objects; `run_case` times every implementation of a case beside its baseline, in the same
run, and turns the times into Records (GB/s, TFLOP/s, fraction of the measured peak, ratio vs the baseline,
max relative error vs the float64 reference)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gpuforge.kernels._selfcheck import relative_error
from gpuforge.profiling.peaks import Peaks
from gpuforge.profiling.timing import time_fn


@dataclass
class BenchCase:
    op: str
    shape: str
    dtype: torch.dtype
    make_inputs: Callable[[], tuple]  # fresh inputs on the device
    fns: dict[str, Callable]  # label -> fn(*inputs); labels: backend names and baselines ("torch", "cuBLAS", …)
    baseline: str  # the label every other row is compared with
    bytes: int  # fewest bytes the op must move (inputs read once, outputs written once)
    flops: int = 0  # 0 for memory-bound ops
    reference: Callable | None = None  # float64 fn(*inputs) for the error column
    size: int = 0  # x-axis of the plot (elements, or M for GEMMs)


@dataclass
class Record:
    op: str
    label: str
    shape: str
    dtype: str
    device: str
    median_ms: float
    min_ms: float
    p20_ms: float
    p80_ms: float
    gbps: float
    tflops: float
    fraction_of_peak: float  # of copy bandwidth (memory-bound) or of the GEMM peak (compute-bound)
    speedup_vs_baseline: float
    baseline: str
    max_rel_error: float | None
    size: int = 0
    extra: dict = field(default_factory=dict)


def _first_tensor(out):
    return out[0] if isinstance(out, tuple | list) else out


def run_case(case: BenchCase, device: torch.device, peaks: Peaks, quick: bool) -> list[Record]:
    inputs = case.make_inputs()
    reference = None
    if case.reference is not None:
        reference = _first_tensor(case.reference(*[x.double() if torch.is_tensor(x) and x.is_floating_point()
                                                   else x for x in inputs]))
    timings = {label: time_fn(lambda fn=fn: fn(*inputs), device, quick) for label, fn in case.fns.items()}
    base_ms = timings[case.baseline].median_ms
    records = []
    for label, timing in timings.items():
        seconds = timing.median_ms / 1e3
        gbps = case.bytes / seconds / 1e9
        tflops = case.flops / seconds / 1e12 if case.flops else 0.0
        fraction = tflops / peaks.matmul_tflops if case.flops else gbps / peaks.copy_gbps
        error = None
        if reference is not None:
            error = relative_error(_first_tensor(case.fns[label](*inputs)), reference)
        records.append(Record(case.op, label, case.shape, str(case.dtype).removeprefix("torch."), peaks.device_name,
                              timing.median_ms, timing.min_ms, timing.p20_ms, timing.p80_ms, gbps, tflops,
                              fraction, base_ms / timing.median_ms, case.baseline, error, case.size))
    return records
