"""NVML telemetry decoding, against a stand-in for the `pynvml` module (the external library's API, faked so
our sampling and decoding logic can be checked without a GPU): throttle masks become names with the idle bit
masked, a failing field is recorded instead of ending the thread, and samples are tagged per case."""

import sys
import types

import pytest

from gpuforge.profiling import nvml


class FakeNVMLError(Exception):
    pass


def fake_pynvml(throttle_masks: list[int], power_fails: bool = False) -> types.ModuleType:
    masks = iter(throttle_masks)
    module = types.ModuleType("pynvml")
    module.NVMLError = FakeNVMLError
    module.NVML_CLOCK_SM, module.NVML_CLOCK_MEM, module.NVML_TEMPERATURE_GPU = 0, 1, 0
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetHandleByIndex = lambda index: f"gpu{index}"
    module.nvmlDeviceGetClockInfo = lambda handle, clock: 1980 if clock == 0 else 2619
    module.nvmlDeviceGetTemperature = lambda handle, sensor: 61

    def power(handle):
        if power_fails:
            raise FakeNVMLError("Not Supported")
        return 412_000

    module.nvmlDeviceGetPowerUsage = power
    module.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=97)
    # the older name only: the sampler must fall back to it
    module.nvmlDeviceGetCurrentClocksThrottleReasons = lambda handle: next(masks, 0)
    return module


def test_throttle_names_mask_idle_and_keep_unknown_bits():
    assert nvml.throttle_names(0x1) == []
    assert nvml.throttle_names(0x1 | 0x4 | 0x40) == ["sw_power_cap", "hw_thermal_slowdown"]
    assert nvml.throttle_names(0x4000) == ["unknown_0x4000"]


def test_samples_are_tagged_per_case_and_field_errors_recorded(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml([0x1, 0x1 | 0x4, 0x0], power_fails=True))
    sampler = nvml.TelemetrySampler(0)
    sampler.mark("vector_add (1024,) float32")  # idle only
    sampler.mark("matmul 4096 bfloat16")  # power capped
    sampler.sample()  # still matmul, no reason
    assert sampler.summary_for("vector_add (1024,) float32")["throttle_reasons"] == []
    matmul = sampler.summary_for("matmul 4096 bfloat16")
    assert matmul["throttle_reasons"] == ["sw_power_cap"] and matmul["samples"] == 2
    assert matmul["sm_clock_mhz_min"] == 1980 and matmul["gpu_util_max"] == 97
    assert "power_w_min" not in matmul  # every power read failed: no value, not a zero
    summary = sampler.summary()
    assert summary["errors"] == {"power_w": "Not Supported"} and summary["samples"] == 3


def test_a_crashing_thread_is_reported(monkeypatch):
    module = fake_pynvml([])
    monkeypatch.setitem(sys.modules, "pynvml", module)
    sampler = nvml.TelemetrySampler(0, interval_s=0.001)

    def broken(handle, sensor):
        raise KeyError("driver went away")

    module.nvmlDeviceGetTemperature = broken  # not an NVMLError: ends the thread
    summary = sampler.start().stop()
    assert summary["thread_error"] == "KeyError: 'driver went away'"


@pytest.mark.parametrize("name", ["nvmlDeviceGetCurrentClocksEventReasons",
                                  "nvmlDeviceGetCurrentClocksThrottleReasons"])
def test_either_nvml_throttle_call_is_used(name):
    module = types.ModuleType("pynvml")
    setattr(module, name, lambda handle: 0x8)
    assert nvml._throttle_reasons_call(module)(None) == 0x8
