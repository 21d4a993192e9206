"""How `auto` picks on CUDA tensors, exercised on the CPU with an injected timer: the tune cache, the shipped
tables, lazy measurement at first use (GPUFORGE_AUTOTUNE=1), the rule when nothing was measured, and that a
backend measured slower than torch is never chosen. The device is a `torch.device("cuda")` descriptor with
its name injected; the candidates run for real on CPU tensors (Triton in the interpreter)."""

from __future__ import annotations

import json

import pytest
import torch

import gpuforge as gf
from gpuforge.kernels import auto_table, backends
from gpuforge.kernels.softmax import BACKENDS as SOFTMAX

DEVICE = torch.device("cuda", 0)
NAME = "Test GPU 80GB"


@pytest.fixture(autouse=True)
def tables(tmp_path, monkeypatch):
    monkeypatch.setenv("GPUFORGE_TUNE_CACHE", str(tmp_path / "cache" / "tune.json"))
    monkeypatch.setattr(auto_table, "SHIPPED_TABLES", tmp_path / "shipped")
    monkeypatch.delenv("GPUFORGE_AUTOTUNE", raising=False)
    monkeypatch.delenv("GPUFORGE_BACKEND", raising=False)
    monkeypatch.setattr(backends, "device_name", lambda device: NAME)
    auto_table.TABLE.forget()
    yield tmp_path
    auto_table.TABLE.forget()


class InjectedTimer:
    """Times a thunk as `times[backend]`, the backend being the one the thunk ran (recorded by `run`)."""

    def __init__(self, times):
        self.times, self.ran, self.calls = times, [], 0

    def run_softmax(self, x):
        def run(backend):
            self.ran.append(backend)
            return gf.softmax(x, backend=backend)
        return run

    def __call__(self, thunk):
        self.calls += 1
        thunk()
        return self.times[self.ran[-1]]


def _runnable():
    return [b for b in SOFTMAX.loaders if backends.is_available(b)[0] and backends.runs_on(b, torch.device("cpu"))]


def test_buckets_keys_and_device_folders():
    assert auto_table.bucket((1000, 4096, 1, 0, 4097)) == "1024x4096x1x1x8192"
    assert auto_table.key("matmul", torch.bfloat16, (3000, 64), NAME) == "matmul|bfloat16|4096x64|Test GPU 80GB"
    assert auto_table.device_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_measure_records_the_fastest_and_never_one_slower_than_torch(tables):
    x = torch.randn(5, 37)
    candidates = _runnable()
    assert {"torch", "triton"} <= set(candidates)
    for times, want in (({b: 2.0 for b in candidates} | {"triton": 1.0}, "triton"),
                        ({b: 2.0 for b in candidates} | {"torch": 1.0}, "torch")):
        timer = InjectedTimer(times)
        entry_key = auto_table.key("softmax", x.dtype, x.shape, NAME)
        assert auto_table.measure(entry_key, candidates, timer.run_softmax(x), timer) == want
        assert sorted(timer.ran) == sorted(candidates)  # every candidate ran, torch included
        assert auto_table.TABLE.lookup(entry_key, NAME) == (want, "tune cache")
        on_disk = json.loads((tables / "cache" / "tune.json").read_text())["entries"][entry_key]
        assert on_disk["backend"] == want and on_disk["times_ms"] == times
    with pytest.raises(ValueError, match="candidates: must include 'torch'"):
        auto_table.measure("k", ["triton"], lambda b: None, lambda thunk: 1.0)


def test_lazy_measurement_at_first_use_then_the_cache(monkeypatch):
    """GPUFORGE_AUTOTUNE=1: the first call of a key times every candidate, later calls read the entry."""
    x = torch.randn(4, 50)
    timer = InjectedTimer({b: 3.0 for b in _runnable()} | {"torch": 0.5})
    monkeypatch.setattr(auto_table, "cuda_event_timer", timer)
    run = timer.run_softmax(x)
    assert SOFTMAX.select("auto", DEVICE, dtype=x.dtype, shape=x.shape, run=run) == "triton"  # the rule
    assert timer.calls == 0
    monkeypatch.setenv("GPUFORGE_AUTOTUNE", "1")
    assert SOFTMAX.select("auto", DEVICE, dtype=x.dtype, shape=x.shape, run=run) == "torch"
    calls = timer.calls
    assert calls == len(_runnable())
    assert SOFTMAX.select("auto", DEVICE, dtype=x.dtype, shape=(3, 60), run=run) == "torch"  # same bucket
    assert timer.calls == calls
    monkeypatch.setenv("GPUFORGE_BACKEND", "numba")  # a preference wins and measures nothing
    assert SOFTMAX.select("auto", DEVICE, dtype=x.dtype, shape=(1000, 5), run=run) == "numba"
    assert timer.calls == calls
    monkeypatch.setenv("GPUFORGE_AUTOTUNE", "yes")
    monkeypatch.delenv("GPUFORGE_BACKEND")
    with pytest.raises(ValueError, match="GPUFORGE_AUTOTUNE: expected 0 or 1, got 'yes'"):
        SOFTMAX.select("auto", DEVICE, dtype=x.dtype, shape=(9999, 5), run=run)


def test_a_measured_backend_that_cannot_run_here_falls_back_to_the_rule(tables):
    entry_key = auto_table.key("softmax", torch.float32, (4, 64), NAME)
    auto_table.TABLE.record(entry_key, {"torch": 2.0, "cupy": 1.0})
    assert not backends.is_available("cupy")[0]
    assert SOFTMAX.select("auto", DEVICE, dtype=torch.float32, shape=(4, 64)) == SOFTMAX.auto_order[0]


def test_the_tune_cache_comes_before_the_shipped_table(tables):
    entry_key = auto_table.key("softmax", torch.float32, (8, 8), NAME)
    shipped = tables / "shipped" / auto_table.device_slug(NAME) / auto_table.SHIPPED_NAME
    shipped.parent.mkdir(parents=True)
    shipped.write_text(json.dumps({"entries": {entry_key: {"backend": "torch"}}}))
    assert SOFTMAX.select("auto", DEVICE, dtype=torch.float32, shape=(8, 8)) == "torch"
    assert auto_table.TABLE.lookup(entry_key, NAME) == ("torch", "shipped table")
    assert "the shipped table" in auto_table.describe(NAME)
    auto_table.TABLE.record(entry_key, {"torch": 2.0, "triton": 1.0})
    assert SOFTMAX.select("auto", DEVICE, dtype=torch.float32, shape=(8, 8)) == "triton"
    assert "the tune cache" in auto_table.describe(NAME)


def test_cpu_tensors_never_read_the_tables(tables):
    auto_table.TABLE.record(auto_table.key("softmax", torch.float32, (8, 8), NAME), {"torch": 2.0, "triton": 1.0})
    assert SOFTMAX.select("auto", torch.device("cpu"), dtype=torch.float32, shape=(8, 8)) == "torch"


def test_describe_says_the_rule_applies_without_measurements():
    assert "the documented rule" in auto_table.describe(NAME)
    assert "CPU tensors run the torch backend" in auto_table.describe(None)


def test_a_corrupt_cache_raises_naming_the_file(tables):
    path = tables / "cache" / "tune.json"
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tune.json: not a gpuforge tune table"):
        auto_table.TABLE.lookup("k", NAME)
    auto_table.TABLE.forget()
    path.write_text(json.dumps({"entries": {"k": {"fastest": "triton"}}}))
    with pytest.raises(ValueError, match="not a gpuforge tune table"):
        auto_table.TABLE.lookup("k", NAME)


def test_tune_needs_a_cuda_device(capsys):
    from gpuforge import tune

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: tune runs for real (the GPU run covers it)")
    assert tune.main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
