"""Benchmark output: a terminal table, a JSON file with the environment, and PNG plots of throughput vs size."""

from __future__ import annotations

import datetime
import json
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path

import torch

from gpuforge.profiling.harness import Record
from gpuforge.profiling.peaks import Peaks

COLUMNS = ("op", "label", "shape", "dtype", "median_ms", "p20_ms", "p80_ms", "gbps", "tflops",
           "fraction_of_peak", "speedup_vs_baseline", "max_rel_error")


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table(records: list[Record]) -> str:
    rows = [[_fmt(getattr(r, c)) for c in COLUMNS] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    line = lambda cells: "  ".join(cell.ljust(w) for cell, w in zip(cells, widths))
    return "\n".join([line(COLUMNS), line(["-" * w for w in widths])] + [line(row) for row in rows])


def markdown_table(records: list[Record]) -> str:
    header = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)
    return "\n".join([header] + ["| " + " | ".join(_fmt(getattr(r, c)) for c in COLUMNS) + " |" for r in records])


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


def write_markdown(path: Path, env: dict, records: list[Record], telemetry: dict | None, ops: list[str]) -> None:
    """The report: environment, ceilings, telemetry, one table and plot per op, the roofline."""
    lines = [f"# gpuforge benchmark report — {env['device']}", "",
             f"- date: {env['date']}", f"- command: `{env['command']}`", f"- git commit: {env['git_commit']}",
             f"- torch {env['torch']}, triton {env.get('triton')}, CUDA {env.get('cuda', '-')}, "
             f"driver {env.get('driver', '-')}",
             f"- measured ceilings: copy {env['peaks']['copy_gbps']:.1f} GB/s, "
             f"GEMM {env['peaks']['matmul_tflops']:.2f} TFLOP/s ({env['peaks']['matmul_dtype']})"]
    if not env["gpu_timings"]:
        lines += ["", "> **CPU run: kernels ran in the Triton interpreter / numba.cuda simulator. Times are CPU "
                  "times of simulators, not GPU timings; only the error columns are meaningful.**"]
    if telemetry:
        lines += ["", "NVML telemetry during the run: " + ", ".join(f"{k} {v}" for k, v in telemetry.items())]
    for op in ops:
        op_records = [r for r in records if r.op == op]
        if op_records:
            lines += ["", f"## {op}", "", markdown_table(op_records), "", f"![{op}]({op}.png)"]
    for name, title in (("roofline.png", "Roofline"), ("bandwidth.png", "Memory-bound kernels")):
        if (path.parent / name).exists():
            lines += ["", f"## {title}", "", f"![{title}]({name})"]
    path.write_text("\n".join(lines) + "\n")
