"""The README results section is rendered from a results file, between its markers, and nowhere else: baseline
rows (as the harness marked them, whatever their label) never count as gpuforge's best, the targets are judged,
and the roofline link points at that run's folder; --publish files a report under its device's folder."""

import json

from gpuforge.profiling import readme_results


def row(label, shape, size, tflops, speedup, *, baseline_row=False, secondary=None, error=0.0):
    return {"op": "matmul", "label": label, "shape": shape, "dtype": "bfloat16", "size": size, "tflops": tflops,
            "gbps": 1.0, "fraction_of_peak": tflops / 800, "median_ms": 1 / speedup, "speedup_vs_baseline": speedup,
            "baseline": "cuBLAS", "max_rel_error": error, "is_baseline": baseline_row,
            "secondary_baseline": "tinygemm" if secondary else None, "speedup_vs_secondary": secondary}


ENV = {"device": "NVIDIA H100 80GB HBM3", "date": "2026-11-23T00:00:00", "git_commit": "0123456789abc",
       "command": "bench all", "peaks": {"copy_gbps": 3000.0, "matmul_tflops": 800.0, "matmul_dtype": "bfloat16"},
       "gpu_timings": True}


def test_render_and_replace_between_markers(tmp_path):
    records = [
        row("cuBLAS", "4096x4096x4096 fwd", 4096, 700.0, 1.0, baseline_row=True),
        # a baseline with a label no list knows, faster than every gpuforge row: still not "best gpuforge"
        row("vendor kernel", "4096x4096x4096 fwd", 4096, 750.0, 1.07, baseline_row=True),
        row("triton", "4096x4096x4096 fwd", 4096, 650.0, 0.93, secondary=1.2, error=3e-3),
        row("triton", "64x64x64 fwd", 64, 1.0, 2.0, error=1e-3),
    ]
    run = tmp_path / "profiling" / "results" / "nvidia-h100"
    run.mkdir(parents=True)
    env = {**ENV, "failed_rows": ["matmul 8192 bfloat16 cuda: OutOfResources"], "skipped_cases": []}
    (run / "results.json").write_text(json.dumps({"environment": env, "records": records}))
    (run / "roofline.png").write_bytes(b"png")
    rows = readme_results.summary_rows(records)
    assert rows == ["| matmul | 4096x4096x4096 fwd | bfloat16 | triton | 650.0 TFLOP/s | 81% | 0.93x cuBLAS | "
                    "1.20x tinygemm | 3.0e-03 |"]
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{readme_results.START}\nold\n{readme_results.END}\noutro\n")
    readme_results.update_readme(readme, run / "results.json")
    updated = readme.read_text()
    assert updated.startswith("intro\n") and updated.endswith("outro\n") and "old" not in updated
    section = updated.split(readme_results.START)[1].split(readme_results.END)[0]
    assert "NVIDIA H100" in section and rows[0] in section
    assert "| triton >= 0.9x cuBLAS, bf16 4096^3, 8192^3 | 1 | 0.93x | 4096x4096x4096 fwd bfloat16 | met |" in section
    assert "profiling/results/nvidia-h100/roofline.png)" in section
    assert "**Incomplete run: 1 row(s) failed; the report lists them.**" in section


def test_publish_copies_the_report_under_the_device_slug(tmp_path):
    report = tmp_path / "bench"
    report.mkdir()
    (report / "results.json").write_text(json.dumps({"environment": ENV, "records": []}))
    (report / "report.md").write_text("# report")
    (report / "matmul.png").write_bytes(b"png")
    (report / "install.log").write_text("not part of a report")
    published = readme_results.publish(report, tmp_path / "results")
    assert published == tmp_path / "results" / "nvidia-h100-80gb-hbm3" / "results.json"
    assert sorted(p.name for p in published.parent.iterdir()) == ["matmul.png", "report.md", "results.json"]
    assert readme_results.device_slug({**ENV, "gpu_timings": False}) == "cpu-interpreter"
