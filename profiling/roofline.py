"""Roofline plot: achieved TFLOP/s against arithmetic intensity (FLOP per byte moved) for every compute
record, under the measured ceilings (copy bandwidth slope, GEMM peak flat line); and, for memory-bound ops
(no FLOP count), a bar chart of the fraction of the measured copy bandwidth each implementation reaches."""

from __future__ import annotations

from pathlib import Path

from gpuforge.profiling.harness import Record
from gpuforge.profiling.peaks import Peaks


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_roofline(records: list[Record], peaks: Peaks, path: Path) -> bool:
    """Write the roofline PNG; False (nothing written) when no record has a FLOP count."""
    points = [r for r in records if r.tflops > 0 and r.gbps > 0]
    if not points:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    intensities = [r.tflops * 1e12 / (r.gbps * 1e9) for r in points]
    low, high = min(intensities) / 4, max(intensities) * 4
    ridge = peaks.matmul_tflops * 1e3 / peaks.copy_gbps
    xs = [low, ridge, max(high, ridge * 2)]
    ax.plot(xs, [min(x * peaks.copy_gbps / 1e3, peaks.matmul_tflops) for x in xs], color="black", linewidth=1.5,
            label=f"ceiling: {peaks.copy_gbps:.0f} GB/s, {peaks.matmul_tflops:.1f} TFLOP/s ({peaks.matmul_dtype})")
    for label in dict.fromkeys(f"{r.op}/{r.label}" for r in points):
        rows = [(i, r) for i, r in zip(intensities, points) if f"{r.op}/{r.label}" == label]
        ax.scatter([i for i, _ in rows], [r.tflops for _, r in rows], label=label, s=22)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"roofline on {peaks.device_name}")
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_bandwidth(records: list[Record], peaks: Peaks, path: Path) -> bool:
    """Best fraction of copy bandwidth per (op, implementation) over the memory-bound records."""
    memory_bound = [r for r in records if r.tflops == 0 and r.gbps > 0]
    if not memory_bound:
        return False
    best: dict[str, float] = {}
    for r in memory_bound:
        key = f"{r.op}/{r.label} {r.dtype}"
        best[key] = max(best.get(key, 0.0), r.fraction_of_peak)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.3 * len(best) + 1.5))
    ax.barh(list(best), [100 * v for v in best.values()])
    ax.set_xlabel(f"% of measured copy bandwidth ({peaks.copy_gbps:.0f} GB/s), best size")
    ax.set_title(f"memory-bound kernels on {peaks.device_name}")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
