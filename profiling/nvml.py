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


# NVML's clocks-event (throttle) reason bits (nvml.h, stable across driver versions). GPU idle is masked out of
# every summary: an idle GPU between launches is not a throttled one.
THROTTLE_REASONS = {
    0x1: "gpu_idle",
    0x2: "applications_clocks_setting",
    0x4: "sw_power_cap",
    0x8: "hw_slowdown",
    0x10: "sync_boost",
    0x20: "sw_thermal_slowdown",
    0x40: "hw_thermal_slowdown",
    0x80: "hw_power_brake_slowdown",
    0x100: "display_clock_setting",
}
IDLE_BIT = 0x1


def throttle_names(mask: int) -> list[str]:
    """Names of the set bits of an NVML throttle-reason mask, idle excluded; unknown bits as hex."""
    mask &= ~IDLE_BIT
    names = [name for bit, name in THROTTLE_REASONS.items() if mask & bit]
    unknown = mask & ~sum(THROTTLE_REASONS)
    return names + ([f"unknown_0x{unknown:x}"] if unknown else [])


def _throttle_reasons_call(nvml):
    # nvidia-ml-py renamed "clocks throttle reasons" to "clocks event reasons" (r535); take either.
    return getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
        nvml.nvmlDeviceGetCurrentClocksThrottleReasons


def _fields(nvml) -> dict:
    """field -> fn(handle) for one telemetry sample."""
    throttle = _throttle_reasons_call(nvml)
    return {
        "sm_clock_mhz": lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM),
        "mem_clock_mhz": lambda h: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM),
        "power_w": lambda h: nvml.nvmlDeviceGetPowerUsage(h) / 1e3,
        "temperature_c": lambda h: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU),
        "gpu_util": lambda h: nvml.nvmlDeviceGetUtilizationRates(h).gpu,
        "throttle_mask": throttle,
    }


SUMMARY_KEYS = ("sm_clock_mhz", "mem_clock_mhz", "power_w", "temperature_c", "gpu_util")


def summarise(samples: list[dict]) -> dict:
    """min/max of each field over the samples that have it, the union of throttle reasons (idle masked)."""
    out: dict = {"samples": len(samples)}
    for key in SUMMARY_KEYS:
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            out[f"{key}_min"], out[f"{key}_max"] = min(values), max(values)
    mask = 0
    for s in samples:
        mask |= s.get("throttle_mask") or 0
    out["throttle_reasons"] = throttle_names(mask)
    return out


class TelemetrySampler:
    """Samples NVML every `interval_s` in a daemon thread between start() and stop(). `mark(tag)` labels the
    samples that follow (one benchmark case) and takes one sample at once, so even a short case has one.
    An NVML error on one field leaves that field None in the sample and is counted in `errors` (field ->
    message); an error that ends the thread is kept in `thread_error` and shown in the summary."""

    def __init__(self, index: int = 0, interval_s: float = 0.05):
        self.index, self.interval_s = index, interval_s
        self.samples: list[dict] = []
        self.errors: dict[str, str] = {}
        self.thread_error: str | None = None
        self.tag: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = _nvml()
        self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
        self._fields = _fields(self._nvml)

    def sample(self) -> dict:
        row: dict = {"t": time.monotonic(), "tag": self.tag}
        for name, read in self._fields.items():
            try:
                row[name] = read(self._handle)
            except self._nvml.NVMLError as err:
                row[name] = None
                self.errors[name] = str(err)
        with self._lock:
            self.samples.append(row)
        return row

    def mark(self, tag: str) -> None:
        self.tag = tag
        self.sample()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.sample()
                self._stop.wait(self.interval_s)
        except Exception as err:  # noqa: BLE001 - kept and reported: a dead sampler must not look like a quiet GPU
            self.thread_error = f"{type(err).__name__}: {err}"

    def start(self) -> TelemetrySampler:
        self._thread = threading.Thread(target=self._run, daemon=True, name="gpuforge-nvml")
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.summary()

    def summary_for(self, tag: str) -> dict:
        with self._lock:
            return summarise([s for s in self.samples if s["tag"] == tag])

    def summary(self) -> dict:
        with self._lock:
            out = summarise(list(self.samples))
        if self.errors:
            out["errors"] = dict(self.errors)
        if self.thread_error:
            out["thread_error"] = self.thread_error
        return out
