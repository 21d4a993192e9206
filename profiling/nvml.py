"""NVML through nvidia-ml-py (`pynvml`): a device snapshot for `gpuforge info`, and telemetry sampled in a
background thread during a benchmark (clocks, power, temperature, utilisation, throttle reasons), so a
throttled run shows beside its numbers. NVML raises without a GPU: nothing here runs at import time."""

from __future__ import annotations

import threading
import time


def _nvml():
    import pynvml

    pynvml.nvmlInit()
    return pynvml


def driver_version() -> str:
    nvml = _nvml()
    version = nvml.nvmlSystemGetDriverVersion()
    return version.decode() if isinstance(version, bytes) else version


def device_snapshot(index: int = 0) -> dict:
    nvml = _nvml()
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    name = nvml.nvmlDeviceGetName(handle)
    return {
        "name": name.decode() if isinstance(name, bytes) else name,
        "driver": driver_version(),
        "memory_total_gib": memory.total / 2**30,
        "memory_used_gib": memory.used / 2**30,
        "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
        "sm_clock_max_mhz": nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM),
        "mem_clock_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
        "power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
        "power_limit_w": nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3,
        "temperature_c": nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
    }


class TelemetrySampler:
    """Samples NVML every `interval_s` in a daemon thread between start() and stop(); summary() aggregates."""

    def __init__(self, index: int = 0, interval_s: float = 0.05):
        self.index, self.interval_s = index, interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        nvml = _nvml()
        handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
        while not self._stop.is_set():
            self.samples.append({
                "t": time.monotonic(),
                "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                "mem_clock_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_MEM),
                "power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1e3,
                "temperature_c": nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
                "gpu_util": nvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                "throttle_reasons": nvml.nvmlDeviceGetCurrentClocksEventReasons(handle),
            })
            self._stop.wait(self.interval_s)

    def start(self) -> TelemetrySampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.summary()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        keys = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c", "gpu_util")
        out = {f"{k}_min": min(s[k] for s in self.samples) for k in keys}
        out |= {f"{k}_max": max(s[k] for s in self.samples) for k in keys}
        reasons = 0
        for s in self.samples:
            reasons |= s["throttle_reasons"]
        out["throttle_reasons_mask"] = reasons
        out["samples"] = len(self.samples)
        return out
