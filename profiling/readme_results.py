"""Regenerate the README's results section from the newest results file under profiling/results/.

`python -m gpuforge.profiling.readme_results [DIR/results.json]` (default: the newest
profiling/results/*/results.json) replaces the text between the README's `<!-- results:start -->` and
`<!-- results:end -->` markers with a per-op summary: the best gpuforge implementation at the largest size, its
ratio to the baseline and fraction of peak, and the max error."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
START, END = "<!-- results:start -->", "<!-- results:end -->"
BASELINE_LABELS = {"torch", "torch.compile", "cuBLAS", "SDPA-flash", "SDPA-math", "torch-int4", "cuBLAS-bf16"}


def newest_results(folder: Path) -> Path:
    files = sorted(folder.glob("*/results.json"), key=lambda p: json.loads(p.read_text())["environment"]["date"])
    if not files:
        raise FileNotFoundError(f"no results file under {folder}")
    return files[-1]


def summary_rows(records: list[dict]) -> list[str]:
    rows = []
    for op in dict.fromkeys(r["op"] for r in records):
        op_records = [r for r in records if r["op"] == op]
        largest = max(r["size"] for r in op_records)
        at_largest = [r for r in op_records if r["size"] == largest]
        for dtype in dict.fromkeys(r["dtype"] for r in at_largest):
            ours = [r for r in at_largest if r["dtype"] == dtype and r["label"] not in BASELINE_LABELS]
            if not ours:
                continue
            best = max(ours, key=lambda r: r["speedup_vs_baseline"])
            worst_error = max((r["max_rel_error"] or 0.0) for r in ours)
            throughput = f"{best['tflops']:.1f} TFLOP/s" if best["tflops"] else f"{best['gbps']:.0f} GB/s"
            ratio = f"{best['speedup_vs_baseline']:.2f}x {best['baseline']}"
            rows.append(f"| {op} | {best['shape']} | {dtype} | {best['label']} | {throughput} | "
                        f"{100 * best['fraction_of_peak']:.0f}% | {ratio} | {worst_error:.1e} |")
    return rows


def render(results: Path) -> str:
    payload = json.loads(results.read_text())
    env = payload["environment"]
    lines = [f"Device: **{env['device']}**, {env['date'][:10]}, commit {env['git_commit'][:10]}, "
             f"command `{env['command']}` ([full report and plots]({os.path.relpath(results.parent, ROOT)}/)).",
             f"Measured ceilings: copy {env['peaks']['copy_gbps']:.0f} GB/s, GEMM {env['peaks']['matmul_tflops']:.1f} "
             f"TFLOP/s ({env['peaks']['matmul_dtype']})."]
    if not env["gpu_timings"]:
        lines.append("**CPU run (interpreter/simulator): times are not GPU timings; the error column is meaningful.**")
    lines += ["", "| op | shape | dtype | best gpuforge | throughput | of peak | vs baseline | max rel. error |",
              "|---|---|---|---|---|---|---|---|", *summary_rows(payload["records"])]
    return "\n".join(lines)


def update_readme(readme: Path, results: Path) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{render(results)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    results = Path(argv[0]) if argv else newest_results(ROOT / "profiling" / "results")
    update_readme(ROOT / "README.md", results)
    print(f"README results section regenerated from {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
