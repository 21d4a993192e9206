"""Report, roofline and regression comparison on synthetic records (no timing involved)."""

import json
from dataclasses import asdict

from gpuforge.profiling import compare, report, roofline
from gpuforge.profiling.harness import Record
from gpuforge.profiling.peaks import Peaks

PEAKS = Peaks("test device", copy_gbps=3000.0, matmul_tflops=800.0, matmul_dtype="bfloat16")


def record(op, label, median_ms, tflops=0.0, gbps=100.0, shape="(8,)"):
    return Record(op, label, shape, "bfloat16", PEAKS.device_name, median_ms, median_ms, median_ms, median_ms, gbps,
                  tflops, 0.5, 1.0, "torch", 1e-3, 8)


def write(path, records):
    path.write_text(json.dumps({"environment": {}, "records": [asdict(r) for r in records]}))


def test_compare_flags_only_growth_beyond_threshold(tmp_path):
    write(tmp_path / "old.json", [record("mm", "triton", 1.0), record("mm", "cuda", 1.0), record("sm", "x", 1.0)])
    write(tmp_path / "new.json", [record("mm", "triton", 1.05), record("mm", "cuda", 1.3)])
    lines, regressions = compare.compare(tmp_path / "old.json", tmp_path / "new.json", threshold=0.1)
    assert regressions == 1
    assert any(line.startswith("REGRESSION") and "mm/cuda" in line for line in lines)
    assert any(line.startswith("missing") and "sm/x" in line for line in lines)
    assert compare.main([str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1


def test_roofline_and_bandwidth_plots(tmp_path):
    compute = [record("matmul", "triton", 1.0, tflops=600.0, gbps=900.0), record("matmul", "cuBLAS", 1.0, 700, 950)]
    memory = [record("softmax", "triton", 1.0, gbps=2700.0)]
    assert roofline.plot_roofline(compute + memory, PEAKS, tmp_path / "roofline.png")
    assert roofline.plot_bandwidth(compute + memory, PEAKS, tmp_path / "bandwidth.png")
    assert not roofline.plot_roofline(memory, PEAKS, tmp_path / "none.png")
    assert (tmp_path / "roofline.png").stat().st_size > 1000


def test_markdown_report_has_a_table_per_op_and_the_cpu_banner(tmp_path):
    env = {"device": "cpu", "date": "2026-11-23", "command": "bench all", "git_commit": "abc", "torch": "2.13",
           "triton": "3.9", "peaks": asdict(PEAKS), "gpu_timings": False}
    records = [record("matmul", "triton", 1.0, 10.0), record("softmax", "triton", 2.0)]
    report.write_markdown(tmp_path / "report.md", env, records, None, ["matmul", "softmax"])
    text = (tmp_path / "report.md").read_text()
    assert "## matmul" in text and "## softmax" in text and "not GPU timings" in text
    assert text.count("| matmul | triton |") == 1
