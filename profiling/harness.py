"""Benchmark protocol and runner. `profiling/bench_<op>.py` modules define `bench_cases(device, quick)`
returning BenchCase objects; `run_case` times every implementation of a case beside its baselines, in the same
run, and turns the times into Records (GB/s, TFLOP/s, fraction of the measured peak, ratios vs the primary and
secondary baselines, max relative error vs the float64 reference, peak memory of one call).

Which rows are baselines (PyTorch, cuBLAS, SDPA, tinygemm, torch.compile) is stated by each case, never guessed
from a label, and carried into every Record as `is_baseline`.

Fraction of peak: a memory-bound op (no FLOP count) is compared with the copy bandwidth; an op with a FLOP count
with its roofline-attainable throughput min(GEMM peak, arithmetic intensity × copy bandwidth). For a GEMM with
high intensity that is the GEMM peak; for an int4 decode GEMM (M = 1..16, a few FLOP per byte) it is the
bandwidth slope, so the fraction says how close the kernel is to reading its bytes at copy speed."""

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
    secondary_baseline: str | None = None  # a second ratio column (torch.compile, tinygemm), when it runs here
    other_baselines: tuple[str, ...] = ()  # further non-gpuforge rows (e.g. SDPA's math backend)
    causal: bool | None = None  # attention cases: masked or not (the CLI's --causal filter); None elsewhere

    def baseline_labels(self) -> set[str]:
        return {self.baseline, *self.other_baselines} | ({self.secondary_baseline} - {None})


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
    fraction_of_peak: float  # of copy bandwidth (memory-bound) or of the roofline-attainable TFLOP/s
    speedup_vs_baseline: float
    baseline: str
    max_rel_error: float | None
    size: int = 0
    is_baseline: bool = False
    secondary_baseline: str | None = None
    speedup_vs_secondary: float | None = None  # None where the secondary baseline does not run
    peak_memory_mib: float | None = None  # above the inputs, one call; None on a CPU (not measured)
    throttle: str | None = None  # NVML throttle reasons during the case ("none", or names); None: no telemetry
    extra: dict = field(default_factory=dict)


def _first_tensor(out):
    return out[0] if isinstance(out, tuple | list) else out


def call_with_peak_memory(fn: Callable[[], object], device: torch.device) -> tuple[object, float | None]:
    """(fn(), peak MiB allocated above what was allocated before the call); the peak is None off a GPU."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, (torch.cuda.max_memory_allocated(device) - before) / 2**20


def fraction_of_peak(gbps: float, tflops: float, peaks: Peaks) -> float:
    """Of the copy bandwidth without FLOPs; else of min(GEMM peak, intensity × bandwidth) (see module doc)."""
    if not tflops:
        return gbps / peaks.copy_gbps
    intensity = tflops * 1e12 / (gbps * 1e9)  # FLOP per byte
    attainable = min(peaks.matmul_tflops, intensity * peaks.copy_gbps / 1e3)
    return tflops / attainable


def _float64(inputs: tuple) -> list:
    return [x.double() if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs]


def _checked_call(fn: Callable, inputs: tuple, reference, device: torch.device) -> tuple[float | None, float | None]:
    """(max relative error vs the reference, peak MiB) of one call, after timing (warm: no autotuning or
    compilation in the peak); the output is dropped at once so big cases do not hold every label's output."""
    out, peak_mib = call_with_peak_memory(lambda: fn(*inputs), device)
    return (relative_error(_first_tensor(out), reference) if reference is not None else None), peak_mib


def _failure(err: Exception) -> str:
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"[:300]


def run_case(case: BenchCase, device: torch.device, peaks: Peaks, quick: bool) -> tuple[list[Record], dict[str, str]]:
    """(records, failures): a label whose call raises (unsupported shape, compile error, out of memory) is left
    out and its error kept in failures (label -> message), so one broken kernel does not end a sweep; when the
    primary baseline fails, the case has no records."""
    inputs = case.make_inputs()
    reference = _first_tensor(case.reference(*_float64(inputs))) if case.reference is not None else None
    timings, checks, failures = {}, {}, {}
    for label, fn in case.fns.items():
        try:
            timings[label] = time_fn(lambda fn=fn: fn(*inputs), device, quick)
            checks[label] = _checked_call(fn, inputs, reference, device)
        except Exception as err:  # noqa: BLE001 - any kernel failure is reported in the results, not fatal
            failures[label] = _failure(err)
            timings.pop(label, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    if case.baseline not in timings:
        return [], failures
    base_ms = timings[case.baseline].median_ms
    secondary_ms = timings[case.secondary_baseline].median_ms if case.secondary_baseline in timings else None
    baselines = case.baseline_labels()
    records = []
    for label, timing in timings.items():
        seconds = timing.median_ms / 1e3
        gbps = case.bytes / seconds / 1e9
        tflops = case.flops / seconds / 1e12 if case.flops else 0.0
        error, peak_mib = checks[label]
        records.append(Record(
            case.op, label, case.shape, str(case.dtype).removeprefix("torch."), peaks.device_name,
            timing.median_ms, timing.min_ms, timing.p20_ms, timing.p80_ms, gbps, tflops,
            fraction_of_peak(gbps, tflops, peaks), base_ms / timing.median_ms, case.baseline, error, case.size,
            is_baseline=label in baselines,
            secondary_baseline=case.secondary_baseline if secondary_ms is not None else None,
            speedup_vs_secondary=secondary_ms / timing.median_ms if secondary_ms is not None else None,
            peak_memory_mib=peak_mib))
    return records, failures
