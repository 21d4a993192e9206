"""The benchmark harness end to end on this machine: statistics, peaks cache, records, JSON, plot, banner,
the CLI's filters and time budget."""

import json

import pytest
import torch

from gpuforge.profiling import cli, peaks, timing
from gpuforge.profiling.harness import BenchCase, fraction_of_peak, run_case


def test_timing_statistics_are_ordered():
    t = timing.time_cpu(lambda: sum(range(2000)), warmup=1, repeats=7)
    assert t.repeats == 7
    assert 0 < t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms


def test_quantiles_stay_inside_the_samples_with_three_repeats():
    t = timing._summarise([1.0, 2.0, 10.0])
    assert (t.min_ms, t.median_ms) == (1.0, 2.0)
    assert t.min_ms <= t.p20_ms <= t.median_ms <= t.p80_ms <= 10.0
    assert t.p20_ms == pytest.approx(1.4) and t.p80_ms == pytest.approx(6.8)


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

    def broken(x):
        raise RuntimeError("no kernel for this shape")

    case = BenchCase(op="scale", shape="(4096,)", dtype=torch.float32, size=4096,
                     make_inputs=lambda: (torch.randn(4096),),
                     fns={"torch": lambda x: x * 2, "compiled": lambda x: x + x, "wrong": wrong, "broken": broken},
                     baseline="torch", secondary_baseline="compiled", bytes=2 * 4096 * 4, reference=lambda x: x * 2)
    rows, failures = run_case(case, device, peaks.peaks(device), quick=True)
    records = {r.label: r for r in rows}
    assert set(records) == {"torch", "compiled", "wrong"}
    assert failures == {"broken": "RuntimeError: no kernel for this shape"}
    assert records["torch"].speedup_vs_baseline == 1.0
    assert records["torch"].max_rel_error < 1e-6
    assert records["wrong"].max_rel_error == pytest.approx(0.01, rel=1e-3)
    assert records["torch"].gbps > 0 and 0 < records["torch"].fraction_of_peak
    assert [r.is_baseline for r in records.values()] == [True, True, False]
    assert records["compiled"].speedup_vs_secondary == 1.0
    assert records["wrong"].speedup_vs_secondary == pytest.approx(
        records["compiled"].median_ms / records["wrong"].median_ms)
    assert all(r.peak_memory_mib is None for r in rows)  # not measured on a CPU


def test_fraction_of_peak_is_against_the_roofline():
    ceilings = peaks.Peaks("dev", copy_gbps=1000.0, matmul_tflops=100.0, matmul_dtype="bfloat16")
    assert fraction_of_peak(500.0, 0.0, ceilings) == 0.5  # memory-bound: of the copy bandwidth
    assert fraction_of_peak(10.0, 50.0, ceilings) == 0.5  # 5000 FLOP/B: compute-bound, of the GEMM peak
    # 2 FLOP/B (an int4 decode GEMM): attainable 2 TFLOP/s, so reading the bytes at 800 GB/s is 80%
    assert fraction_of_peak(800.0, 1.6, ceilings) == pytest.approx(0.8)


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
    assert {r["label"] for r in payload["records"] if r["is_baseline"]} == {"torch"}
    assert all(r["peak_memory_mib"] is None for r in payload["records"])
    assert (tmp_path / "out" / "vector_add.png").stat().st_size > 1000
    report_text = (tmp_path / "out" / "report.md").read_text()
    assert "not measured (CPU)" in report_text and "| met |" not in report_text and "| missed |" not in report_text


def test_filters_keep_baselines_and_the_named_backends():
    device = torch.device("cpu")
    cases = cli.select_cases(["flash_attention", "vector_add"], device, True, cli.Filters(causal=True))
    assert cases and all(c.op == "flash_attention" and c.causal for c in cases)
    cases = cli.select_cases(["vector_add"], device, True, cli.Filters(backends=("numba",)))
    assert cases and all(set(c.fns) == {"torch", "numba"} for c in cases)
    assert cli.select_cases(["vector_add"], device, True, cli.Filters(dtypes=("bfloat16",))) == []


def test_full_sweep_runs_the_quick_cases_first():
    device = torch.device("cpu")
    quick = [cli.case_tag(c) for c in cli.select_cases(["vector_add"], device, True, cli.Filters())]
    full = [cli.case_tag(c) for c in cli.select_cases(["vector_add"], device, False, cli.Filters())]
    assert full[:len(quick)] == quick and len(full) > len(quick) == len(set(quick))
    assert len(set(full)) == len(full)


def test_time_budget_skips_the_remaining_cases(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFORGE_CACHE", str(tmp_path))
    env, records, _ = cli.run(["vector_add"], torch.device("cpu"), True, None, "test",
                              cli.Filters(backends=("numba",)), time_budget_s=0.0)
    assert len({r.shape for r in records}) == 1  # the first case starts, none after it
    assert env["skipped_cases"] == ["vector_add (4096,) float32"]


def test_unknown_op_and_dtype_are_rejected(capsys):
    with pytest.raises(SystemExit):
        cli.main(["no_such_op"])
    assert "unknown op" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["vector_add", "--dtype", "float8"])
    assert "unknown dtype" in capsys.readouterr().err
