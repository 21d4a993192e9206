"""The benchmark harness end to end on this machine: statistics, peaks cache, records, JSON, plot, banner."""

import json

import pytest
import torch

from gpuforge.profiling import cli, peaks, timing
from gpuforge.profiling.harness import BenchCase, run_case


def test_timing_statistics_are_ordered():
    t = timing.time_cpu(lambda: sum(range(2000)), warmup=1, repeats=7)
    assert t.repeats == 7
    assert 0 < t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms


def test_peaks_are_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFORGE_CACHE", str(tmp_path))
    first = peaks.peaks(torch.device("cpu"))
    assert first.copy_gbps > 0 and first.matmul_tflops > 0
    cached = json.loads((tmp_path / "peaks.json").read_text())
    assert cached[first.device_name]["copy_gbps"] == first.copy_gbps
    assert peaks.peaks(torch.device("cpu")) == first


def test_run_case_fills_every_column(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFORGE_CACHE", str(tmp_path))
    device = torch.device("cpu")
    wrong = lambda x: x * 2.02  # a 1% error must show in the error column
    case = BenchCase(op="scale", shape="(4096,)", dtype=torch.float32, size=4096,
                     make_inputs=lambda: (torch.randn(4096),), fns={"torch": lambda x: x * 2, "wrong": wrong},
                     baseline="torch", bytes=2 * 4096 * 4, reference=lambda x: x * 2)
    records = {r.label: r for r in run_case(case, device, peaks.peaks(device), quick=True)}
    assert records["torch"].speedup_vs_baseline == 1.0
    assert records["torch"].max_rel_error < 1e-6
    assert records["wrong"].max_rel_error == pytest.approx(0.01, rel=1e-3)
    assert records["torch"].gbps > 0 and 0 < records["torch"].fraction_of_peak


def test_bench_cli_writes_json_and_plot_with_cpu_banner(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPUFORGE_CACHE", str(tmp_path))
    assert cli.main(["vector_add", "--quick", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "NOT GPU timings" in printed
    payload = json.loads((tmp_path / "out" / "results.json").read_text())
    assert payload["environment"]["gpu_timings"] is False
    labels = {r["label"] for r in payload["records"]}
    assert {"torch", "triton", "numba"} <= labels
    assert all(r["max_rel_error"] is not None and r["max_rel_error"] < 1e-5 for r in payload["records"])
    assert (tmp_path / "out" / "vector_add.png").stat().st_size > 1000


def test_unknown_op_is_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["no_such_op"])
    assert "unknown op" in capsys.readouterr().err
