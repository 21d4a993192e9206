"""Report, roofline and regression comparison on synthetic records (no timing involved)."""

import json
from dataclasses import asdict

from gpuforge.profiling import compare, report, roofline, targets
from gpuforge.profiling.harness import Record
from gpuforge.profiling.peaks import Peaks

PEAKS = Peaks("test device", copy_gbps=3000.0, matmul_tflops=800.0, matmul_dtype="bfloat16")


def record(op, label, median_ms, tflops=0.0, gbps=100.0, shape="(8,)", spread=0.0):
    return Record(op, label, shape, "bfloat16", PEAKS.device_name, median_ms, median_ms,
                  median_ms * (1 - spread / 2), median_ms * (1 + spread / 2), gbps, tflops, 0.5, 1.0, "torch", 1e-3, 8)


def write(path, records, device="H100"):
    path.write_text(json.dumps({"environment": {"device": device}, "records": [asdict(r) for r in records]}))


def test_compare_threshold_per_row_from_the_recorded_noise(tmp_path):
    write(tmp_path / "old.json", [record("mm", "triton", 1.0), record("mm", "cuda", 1.0, spread=0.2),
                                  record("sm", "x", 1.0)])
    write(tmp_path / "new.json", [record("mm", "triton", 1.12), record("mm", "cuda", 1.25, spread=0.1),
                                  record("ln", "y", 1.0)])
    lines, regressions = compare.compare(tmp_path / "old.json", tmp_path / "new.json", floor=0.05)
    # triton: no recorded noise, so the 5% floor holds and +12% regresses; cuda: 20% + 10% of noise covers +25%
    assert regressions == 1
    assert any(line.startswith("REGRESSION") and "mm/triton" in line for line in lines)
    assert any(line.startswith("ok") and "mm/cuda" in line and "threshold 30%" in line for line in lines)
    assert any(line.startswith("missing") and "sm/x" in line for line in lines)
    assert any(line.startswith("new") and "ln/y" in line for line in lines)
    assert not any(line.startswith("WARNING") for line in lines)
    assert compare.main([str(tmp_path / "old.json"), str(tmp_path / "new.json")]) == 1


def test_compare_warns_across_devices(tmp_path):
    write(tmp_path / "old.json", [record("mm", "triton", 1.0)], device="H100")
    write(tmp_path / "new.json", [record("mm", "triton", 1.0)], device="H200")
    lines, regressions = compare.compare(tmp_path / "old.json", tmp_path / "new.json", floor=0.05)
    assert regressions == 0 and lines[0].startswith("WARNING: different devices (H100 vs H200)")


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
    assert text.count("| matmul | triton | gpuforge |") == 1
    assert f"{len(targets.TARGETS)} not measured (CPU)." in text


def test_markdown_report_shows_throttling_and_nvml_errors(tmp_path):
    env = {"device": "H100", "date": "2026-11-23", "command": "bench all", "git_commit": "abc", "torch": "2.13",
           "triton": "3.9", "peaks": asdict(PEAKS), "gpu_timings": True, "failed_rows": ["mm 8x8 bf16 cuda: Oops"]}
    throttled = record("matmul", "triton", 1.0, 10.0)
    throttled.throttle = "sw_power_cap"
    telemetry = {"samples": 10, "sm_clock_mhz_min": 1500, "throttle_reasons": ["sw_power_cap"],
                 "errors": {"power_w": "Not Supported"}}
    report.write_markdown(tmp_path / "report.md", env, [throttled], telemetry, ["matmul"])
    text = (tmp_path / "report.md").read_text()
    assert "| sw_power_cap |" in text and "Throttle reasons seen (idle masked): sw_power_cap" in text
    assert "power_w: Not Supported" in text and "- mm 8x8 bf16 cuda: Oops" in text
