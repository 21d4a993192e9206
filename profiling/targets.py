"""The project's speed targets for its kernels on an H100/H200, checked against a run's records.

A Target names the rows it judges (op, dtypes, a regular expression on the shape string), one gpuforge
implementation and a metric: the fraction of the measured peak, a speed ratio
`time(baseline) / time(implementation)` against a baseline measured in the same case, or an absolute TFLOP/s
(where the bar is a published figure rather than a library in the same run). A target is met when
every matching (shape, dtype) reaches the threshold; its reported value is the worst one. A CPU run
(interpreter / simulator) measures nothing: every target is "not measured (CPU)". A target whose rows are
absent (a backend that did not build, a sweep cut by --quick or the time budget) is "not measured (no rows)".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FRACTION = "fraction_of_peak"
TFLOPS = "tflops"  # an absolute rate: the published figure of the best kernel of its class


@dataclass(frozen=True)
class Target:
    measures: str  # what the target measures and why it is the bar, in a few words
    op: str
    implementation: str
    metric: str  # FRACTION, or the label of a baseline measured in the same case
    threshold: float
    dtypes: tuple[str, ...]
    shape: str  # regular expression searched in the record's shape
    what: str  # the rows, in words

    def describe(self) -> str:
        need = (f">= {100 * self.threshold:.0f}% of peak" if self.metric == FRACTION else
                f">= {self.threshold:g} TFLOP/s" if self.metric == TFLOPS else f">= {self.threshold:g}x {self.metric}")
        return f"{self.implementation} {need}, {self.what}"


@dataclass(frozen=True)
class Verdict:
    target: Target
    status: str  # "met", "missed", "not measured (CPU)", "not measured (no rows)"
    value: float | None  # the worst matching value
    rows: int  # matching (shape, dtype) groups
    worst_shape: str | None


BF16, FP16, FP32 = "bfloat16", "float16", "float32"
_VECTOR = r"^\(268435456,\)$"
_GEMM = r"^(4096|8192)x\1x\1 fwd$"
_SOFTMAX = r"^\(4096, \d+\) fwd$"
_RMS = r"^\((4096, 4096|16384, 8192)\) fwd\+bwd$"
_FLASH = r"^B4 H32 S4096 D128( causal)? "
_LONG_FLASH = r"^B\d+ H\d+ S(8192|16384) D128( causal)? fwd$"
_DECODE = r"^M=(1|4|16) N=(4096|11008|8192) K=(4096|11008|8192) g128$"
_PREFILL = r"^M=2048 .* g128$"


def _each(implementations: tuple[str, ...], *args) -> tuple[Target, ...]:
    measures, op, *rest = args
    return tuple(Target(measures, op, impl, *rest) for impl in implementations)


# What each kind of target measures (a memory-bound op is judged by the measured copy bandwidth, a compute-bound
# one by the fastest library kernel for the same problem, measured in the same run).
BANDWIDTH = "share of the copy bandwidth (memory-bound)"
CUBLAS = "speed vs cuBLAS (tensor-core GEMM)"
EAGER = "speed vs PyTorch eager"
COMPILED = "speed vs torch.compile's fused kernel"
SDPA = "speed vs SDPA's FlashAttention-2"
FA3 = "rate of FlashAttention-3's class (published, H100)"
TINYGEMM = "speed vs torch's int4 kernel (tinygemm)"
DECODE_CUBLAS = "int4 decode vs bf16 cuBLAS (4x fewer weight bytes)"


TARGETS = (
    *_each(("triton", "cuda"), BANDWIDTH, "vector_add", FRACTION, 0.90, (FP32,), _VECTOR, "2^28 fp32"),
    Target(CUBLAS, "matmul", "triton", "cuBLAS", 0.90, (BF16,), _GEMM, "bf16 4096^3, 8192^3"),
    Target(CUBLAS, "matmul", "cuda", "cuBLAS", 0.75, (BF16,), _GEMM, "bf16 4096^3, 8192^3"),
    Target(CUBLAS, "matmul", "cuda-wgmma", "cuBLAS", 0.90, (BF16,), _GEMM, "bf16 4096^3, 8192^3 (sm_90a wgmma)"),
    *_each(("triton", "cuda"), BANDWIDTH, "softmax", FRACTION, 0.85, (FP16, BF16), _SOFTMAX, "4096 x 1K..32K fwd"),
    *_each(("triton", "cuda"), EAGER, "softmax", "torch", 1.0, (FP16, BF16), _SOFTMAX, "4096 x 1K..32K fwd"),
    *_each(("triton", "cuda"), EAGER, "rms_norm", "torch", 1.3, (BF16,), _RMS, "4096x4096, 16384x8192 fwd+bwd"),
    *_each(("triton", "cuda"), COMPILED, "rms_norm", "torch.compile", 1.0, (BF16,), _RMS,
           "4096x4096, 16384x8192 fwd+bwd"),
    *_each(("triton", "cuda"), BANDWIDTH, "rms_norm", FRACTION, 0.80, (BF16,), _RMS, "4096x4096, 16384x8192 fwd+bwd"),
    Target(SDPA, "flash_attention", "triton", "SDPA-flash", 1.0, (BF16,), _FLASH + "fwd$", "B4 H32 S4096 D128 fwd"),
    Target(SDPA, "flash_attention", "cuda", "SDPA-flash", 0.8, (BF16,), _FLASH + "fwd$", "B4 H32 S4096 D128 fwd"),
    Target(SDPA, "flash_attention", "triton", "SDPA-flash", 0.8, (BF16,), _FLASH + r"fwd\+bwd$",
           "B4 H32 S4096 D128 backward (timed as fwd+bwd)"),
    Target(FA3, "flash_attention", "cuda-wgmma", TFLOPS, 550, (BF16,), _LONG_FLASH,
           "S 8K..16K D128 fwd (sm_90a wgmma)"),
    Target(BANDWIDTH, "paged_attention", "triton", FRACTION, 0.70, (BF16,), r"^B32 .* ctx\d+ ",
           "batch 32, 4K..32K context"),
    *_each(("cuda", "triton"), DECODE_CUBLAS, "int4_matmul", "cuBLAS", 2.5, (BF16,), _DECODE,
           "decode M=1,4,16, Llama shapes"),
    *_each(("cuda", "triton"), TINYGEMM, "int4_matmul", "torch int4 (tinygemm)", 1.0, (BF16,), _DECODE,
           "decode M=1,4,16, Llama shapes"),
    *_each(("cuda", "triton"), CUBLAS, "int4_matmul", "cuBLAS", 0.7, (BF16,), _PREFILL, "prefill M=2048"),
)


def _value(target: Target, group: dict[str, dict]) -> float | None:
    """The target's metric in one (shape, dtype) group of records (label -> record); None if a row is absent."""
    row = group.get(target.implementation)
    if row is None:
        return None
    if target.metric == FRACTION:
        return row["fraction_of_peak"]
    if target.metric == TFLOPS:
        return row["tflops"]
    baseline = group.get(target.metric)
    return baseline["median_ms"] / row["median_ms"] if baseline is not None else None


def evaluate(target: Target, records: list[dict], gpu_timings: bool) -> Verdict:
    if not gpu_timings:
        return Verdict(target, "not measured (CPU)", None, 0, None)
    pattern = re.compile(target.shape)
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in records:
        if r["op"] == target.op and r["dtype"] in target.dtypes and pattern.search(r["shape"]):
            groups.setdefault((r["shape"], r["dtype"]), {})[r["label"]] = r
    values = {key: v for key, group in groups.items() if (v := _value(target, group)) is not None}
    if not values:
        return Verdict(target, "not measured (no rows)", None, 0, None)
    worst = min(values, key=values.get)
    status = "met" if values[worst] >= target.threshold else "missed"
    return Verdict(target, status, values[worst], len(values), f"{worst[0]} {worst[1]}")


def evaluate_all(records: list[dict], gpu_timings: bool) -> list[Verdict]:
    return [evaluate(t, records, gpu_timings) for t in TARGETS]


def status_counts(verdicts: list[Verdict]) -> str:
    """'3 met, 2 missed, 19 not measured (no rows)': how many targets ended in each status."""
    counts = {status: sum(v.status == status for v in verdicts) for status in dict.fromkeys(v.status for v in verdicts)}
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def _format_value(verdict: Verdict) -> str:
    if verdict.value is None:
        return "–"
    if verdict.target.metric == FRACTION:
        return f"{100 * verdict.value:.0f}%"
    if verdict.target.metric == TFLOPS:
        return f"{verdict.value:.0f} TFLOP/s"
    return f"{verdict.value:.2f}x"


def markdown_table(verdicts: list[Verdict]) -> str:
    lines = ["| measures | op | dtype | target | rows | worst | at | status |", "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {v.target.measures} | {v.target.op} | {'/'.join(v.target.dtypes)} | {v.target.describe()} | "
              f"{v.rows} | {_format_value(v)} | {v.worst_shape or '–'} | {v.status} |" for v in verdicts]
    return "\n".join(lines)
