"""Regenerate the README's results section from the newest results file under profiling/results/.

`python -m gpuforge.profiling.readme_results [DIR/results.json]` (default: the newest
profiling/results/*/results.json) replaces the text between the README's `<!-- results:start -->` and
`<!-- results:end -->` markers with: the device, date and command; the speed targets (met / missed / not
measured); a per-op summary (the best gpuforge implementation at the largest size, its ratio to the baseline and
the secondary baseline, fraction of peak, max error); and that run's roofline plot.
`--publish REPORT_DIR` first copies a fresh report (e.g. from scripts/gpu_job.sh) to
profiling/results/<device-slug>/ and regenerates the section from it. Baseline rows are the ones the harness
marked `is_baseline`."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from gpuforge.profiling import targets

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "profiling" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def newest_results(folder: Path) -> Path:
    """The newest kernel benchmark results: files whose "environment" names the timed device ("gpu_timings"), not
    the parallel step-time results nor the static inspection report."""
    runs = [(payload["environment"]["date"], path) for path in folder.glob("*/results.json")
            if "gpu_timings" in (payload := json.loads(path.read_text())).get("environment", {})]
    if not runs:
        raise FileNotFoundError(f"no kernel benchmark results file under {folder}")
    return max(runs)[1]


def device_slug(env: dict) -> str:
    """Folder name for a run's device: 'nvidia-h200' for 'NVIDIA H200'; every CPU run is 'cpu-interpreter'."""
    if not env["gpu_timings"]:
        return "cpu-interpreter"
    return re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")


def publish(report_dir: Path, results_root: Path = RESULTS) -> Path:
    """Copy report_dir's report.md, results.json and plots to results_root/<device-slug>/; the new results.json."""
    env = json.loads((report_dir / "results.json").read_text())["environment"]
    target = results_root / device_slug(env)
    target.mkdir(parents=True, exist_ok=True)
    for path in report_dir.iterdir():
        if path.suffix in (".md", ".json", ".png") and path.is_file():
            shutil.copy2(path, target / path.name)
    return target / "results.json"


def _ratio(value: float | None, against: str | None) -> str:
    return "–" if value is None else f"{value:.2f}x {against}"


def summary_rows(records: list[dict]) -> list[str]:
    rows = []
    for op in dict.fromkeys(r["op"] for r in records):
        op_records = [r for r in records if r["op"] == op]
        largest = max(r["size"] for r in op_records)
        at_largest = [r for r in op_records if r["size"] == largest]
        for dtype in dict.fromkeys(r["dtype"] for r in at_largest):
            ours = [r for r in at_largest if r["dtype"] == dtype and not r["is_baseline"]]
            if not ours:
                continue
            best = max(ours, key=lambda r: r["speedup_vs_baseline"])
            worst_error = max((r["max_rel_error"] or 0.0) for r in ours)
            throughput = f"{best['tflops']:.1f} TFLOP/s" if best["tflops"] else f"{best['gbps']:.0f} GB/s"
            vs_baseline = _ratio(best["speedup_vs_baseline"], best["baseline"])
            vs_secondary = _ratio(best["speedup_vs_secondary"], best["secondary_baseline"])
            rows.append(f"| {op} | {best['shape']} | {dtype} | {best['label']} | {throughput} | "
                        f"{100 * best['fraction_of_peak']:.0f}% | {vs_baseline} | {vs_secondary} | {worst_error:.1e} |")
    return rows


def render(results: Path) -> str:
    payload = json.loads(results.read_text())
    env = payload["environment"]
    folder = os.path.relpath(results.parent, ROOT)
    lines = [f"Device: **{env['device']}**, {env['date'][:10]}, commit {env['git_commit'][:10]}, "
             f"command `{env['command']}` ([full report and plots]({folder}/)).",
             f"Measured ceilings: copy {env['peaks']['copy_gbps']:.3g} GB/s, GEMM {env['peaks']['matmul_tflops']:.3g} "
             f"TFLOP/s ({env['peaks']['matmul_dtype']})."]
    if not env["gpu_timings"]:
        lines.append("**GPU: not yet measured.** This is a CPU run (interpreter/simulator): its times are not GPU "
                     "timings and no speed target is judged by it; the error column is meaningful.")
    left_out = [f"{len(env[key])} {what}" for key, what in (("failed_rows", "row(s) failed"),
                                                              ("skipped_cases", "case(s) not run (time budget)"))
                if env.get(key)]
    if left_out:
        lines.append(f"**Incomplete run: {', '.join(left_out)}; the report lists them.**")
    verdicts = targets.evaluate_all(payload["records"], env["gpu_timings"])
    lines += ["", f"Speed targets in this run: {targets.status_counts(verdicts)}.", "",
              targets.markdown_table(verdicts)]
    lines += ["", "| op | shape | dtype | best gpuforge | throughput | of peak | vs baseline | vs secondary | "
              "max rel. error |", "|---|---|---|---|---|---|---|---|---|", *summary_rows(payload["records"])]
    if (results.parent / "roofline.png").exists():
        lines += ["", f"![roofline]({folder}/roofline.png)"]
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
    if argv[:1] == ["--publish"]:
        if len(argv) != 2:
            raise SystemExit("usage: python -m gpuforge.profiling.readme_results --publish REPORT_DIR")
        results = publish(Path(argv[1]))
        print(f"copied {argv[1]} to {results.parent}")
    else:
        results = Path(argv[0]) if argv else newest_results(RESULTS)
    update_readme(ROOT / "README.md", results)
    print(f"README results section regenerated from {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
