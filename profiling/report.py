"""Benchmark output: a terminal table, a JSON file with the environment, PNG plots of throughput vs size, and
the Markdown report (tables per op, the speed targets met / missed / not measured, telemetry, plots)."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

from gpuforge.profiling import targets
from gpuforge.profiling.harness import Record
from gpuforge.profiling.peaks import Peaks

COLUMNS = ("op", "label", "role", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "gbps", "tflops",
           "of_peak", "vs_baseline", "vs_secondary", "max_rel_error", "peak_mib", "throttle")
NOT_MEASURED = "–"


def _fmt(value) -> str:
    if value is None:
        return NOT_MEASURED
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _ratio(value: float | None, against: str | None) -> str:
    return NOT_MEASURED if value is None else f"{value:.3g}x {against}"


def cells(r: Record) -> list[str]:
    """One table row, in COLUMNS order."""
    computed = {"role": "baseline" if r.is_baseline else "gpuforge", "of_peak": f"{100 * r.fraction_of_peak:.1f}%",
                "vs_baseline": _ratio(r.speedup_vs_baseline, r.baseline),
                "vs_secondary": _ratio(r.speedup_vs_secondary, r.secondary_baseline),
                "peak_mib": _fmt(r.peak_memory_mib)}
    return [computed[c] if c in computed else _fmt(getattr(r, c)) for c in COLUMNS]


def table(records: list[Record]) -> str:
    rows = [cells(r) for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    line = lambda row: "  ".join(cell.ljust(w) for cell, w in zip(row, widths))
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(row) for row in rows])


def markdown_table(records: list[Record]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    return "\n".join([header] + ["| " + " | ".join(cells(r)) + " |" for r in records])


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: torch.device, peaks: Peaks, command: str) -> dict:
    now = datetime.datetime.now(datetime.timezone.utc)
    env = {"device": peaks.device_name, "date": now.isoformat(timespec="seconds"),
           "command": command, "git_commit": _git_commit(), "torch": torch.__version__,
           "python": platform.python_version(), "peaks": asdict(peaks), "gpu_timings": device.type == "cuda"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device.type == "cuda":
        from gpuforge.profiling.nvml import driver_version

        env["cuda"] = torch.version.cuda
        env["driver"] = driver_version()
    return env


def write_json(path: Path, env: dict, records: list[Record], telemetry: dict | None = None) -> None:
    payload = {"environment": env, "records": [asdict(r) for r in records], "telemetry": telemetry}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)


def plot(records: list[Record], path: Path, title: str) -> None:
    """Throughput vs size, one line per implementation (TFLOP/s for compute-bound ops, GB/s otherwise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    compute_bound = any(r.tflops for r in records)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in dict.fromkeys(f"{r.label} {r.dtype}" for r in records):
        rows = sorted((r for r in records if f"{r.label} {r.dtype}" == label), key=lambda r: r.size)
        ax.plot([r.size for r in rows], [r.tflops if compute_bound else r.gbps for r in rows], marker="o",
                label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("problem size")
    ax.set_ylabel("TFLOP/s" if compute_bound else "GB/s")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _telemetry_lines(telemetry: dict) -> list[str]:
    overall = {k: v for k, v in telemetry.items() if k not in ("errors", "thread_error", "throttle_reasons")}
    lines = ["", "## NVML telemetry", "", "During the run: " + ", ".join(f"{k} {_fmt(v)}" for k, v in overall.items()),
             "", f"Throttle reasons seen (idle masked): {', '.join(telemetry.get('throttle_reasons') or []) or 'none'}"
             " (per case in the `throttle` column)."]
    if telemetry.get("errors"):
        lines += ["", "NVML errors (field: message): " + "; ".join(f"{k}: {v}" for k, v in telemetry["errors"].items())]
    if telemetry.get("thread_error"):
        lines += ["", f"**The sampling thread stopped early: {telemetry['thread_error']}**"]
    return lines


def write_markdown(path: Path, env: dict, records: list[Record], telemetry: dict | None, ops: list[str]) -> None:
    """The report: environment, ceilings, targets, telemetry, one table and plot per op, the roofline."""
    lines = [f"# gpuforge benchmark report — {env['device']}", "",
             f"- date: {env['date']}", f"- command: `{env['command']}`", f"- git commit: {env['git_commit']}",
             f"- torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda', '-')}, "
             f"driver {env.get('driver', '-')}",
             f"- measured ceilings: copy {env['peaks']['copy_gbps']:.1f} GB/s, "
             f"GEMM {env['peaks']['matmul_tflops']:.2f} TFLOP/s ({env['peaks']['matmul_dtype']})",
             "- of_peak: of the copy bandwidth for memory-bound ops; of min(GEMM peak, intensity x bandwidth) for "
             "ops with a FLOP count (the roofline's attainable throughput, so int4 decode is judged by bandwidth)",
             f"- peak_mib: memory allocated above the inputs by one call ({NOT_MEASURED}: not measured, CPU)"]
    if not env["gpu_timings"]:
        lines += ["", "> **CPU run: kernels ran in the Triton interpreter / numba.cuda simulator. Times are CPU "
                  "times of simulators, not GPU timings; only the error columns are meaningful.**"]
    verdicts = targets.evaluate_all([asdict(r) for r in records], env["gpu_timings"])
    lines += ["", "## Targets", "", targets.status_counts(verdicts) + ".", "", targets.markdown_table(verdicts)]
    if env.get("failed_rows"):
        lines += ["", f"**{len(env['failed_rows'])} row(s) failed (left out of the tables):**", "",
                  *[f"- {line}" for line in env["failed_rows"]]]
    if env.get("skipped_cases"):
        lines += ["", f"**Time budget spent: {len(env['skipped_cases'])} case(s) not run:** "
                  + "; ".join(env["skipped_cases"])]
    if telemetry:
        lines += _telemetry_lines(telemetry)
    for op in ops:
        op_records = [r for r in records if r.op == op]
        if op_records:
            lines += ["", f"## {op}", "", markdown_table(op_records), "", f"![{op}]({op}.png)"]
    for name, title in (("roofline.png", "Roofline"), ("bandwidth.png", "Memory-bound kernels")):
        if (path.parent / name).exists():
            lines += ["", f"## {title}", "", f"![{title}]({name})"]
    path.write_text("\n".join(lines) + "\n")
