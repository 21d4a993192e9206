"""How `backend="auto"` picks a backend for CUDA tensors: measurements first, a documented rule last.

For an (op, dtype, shape bucket, device name) key, the first of these that has an entry decides:

1. the user's tune cache, a JSON file at $GPUFORGE_TUNE_CACHE (default ~/.cache/gpuforge/tune.json), written by
   `python -m gpuforge tune` and, when GPUFORGE_AUTOTUNE=1, at the first eager call with a key it lacks (as
   `torch.backends.cudnn.benchmark` does): every backend that accepts the input, PyTorch's own included, runs
   the call's inputs and is timed with CUDA events (median of repeats, after a warm-up);
2. a table shipped with gpuforge, profiling/results/<device>/auto_table.json, written by the same timing on
   a GPU run (none is shipped yet: no GPU run has written one);
3. the rule: the op's `auto_order`, the first installed backend that accepts the input. Not a measurement.

A measured entry names the fastest backend of its key, so `auto` never picks a backend measured slower than
PyTorch there. Shape buckets round each dimension the op names up to a power of two. The forward is timed;
the backward follows the forward's choice. CPU tensors always run the torch backend; this table is not read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

SHIPPED_TABLES = Path(__file__).resolve().parent.parent / "profiling" / "results"
SHIPPED_NAME = "auto_table.json"

Timer = Callable[[Callable[[], object]], float]  # runs the thunk, returns its time in milliseconds


def cache_path() -> Path:
    return Path(os.environ.get("GPUFORGE_TUNE_CACHE", Path.home() / ".cache" / "gpuforge" / "tune.json"))


_forced: list[list[str]] = []  # while `forced()` runs: the keys it recorded


@contextlib.contextmanager
def forced():
    """Measure every eligible call anew while inside (what `gpuforge tune` does); yields the keys recorded."""
    recorded: list[str] = []
    _forced.append(recorded)
    try:
        yield recorded
    finally:
        _forced.pop()


def measuring_anew() -> bool:
    return bool(_forced)


def autotune_on() -> bool:
    """GPUFORGE_AUTOTUNE=1 (or inside `forced()`): time the candidates of a key the tables lack."""
    if _forced:
        return True
    value = os.environ.get("GPUFORGE_AUTOTUNE", "0")
    if value not in ("0", "1"):
        raise ValueError(f"GPUFORGE_AUTOTUNE: expected 0 or 1, got {value!r}")
    return value == "1"


def device_slug(device_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3': the folder of a device's shipped results."""
    return "-".join("".join(c if c.isalnum() else " " for c in device_name.lower()).split())


def bucket(shape: Sequence[int]) -> str:
    """Each dimension rounded up to a power of two, joined by 'x' ('' for no dimensions)."""
    return "x".join(str(1 if d <= 1 else 2 ** math.ceil(math.log2(d))) for d in shape)


def key(op: str, dtype: torch.dtype | None, shape: Sequence[int], device_name: str) -> str:
    return "|".join((op, str(dtype).removeprefix("torch.") if dtype is not None else "-", bucket(shape), device_name))


def _read(path: Path) -> dict:
    try:
        table = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a gpuforge tune table ({error}); delete it or run `python -m gpuforge tune` "
                         "again") from None
    entries = table.get("entries") if isinstance(table, dict) else None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and isinstance(e.get("backend"), str)
                                                for e in entries.values()):
        raise ValueError(f"{path}: not a gpuforge tune table (expected {{'entries': {{key: {{'backend': ...}}}}}})")
    return entries


class AutoTable:
    """The user's cache and the shipped tables, read once per process and kept up to date by `record`."""

    def __init__(self) -> None:
        self._cache: dict[Path, dict] = {}
        self._shipped: dict[str, dict] = {}

    def user_entries(self) -> dict:
        path = cache_path()
        if path not in self._cache:
            self._cache[path] = _read(path)
        return self._cache[path]

    def shipped_entries(self, device_name: str) -> dict:
        slug = device_slug(device_name)
        if slug not in self._shipped:
            self._shipped[slug] = _read(SHIPPED_TABLES / slug / SHIPPED_NAME)
        return self._shipped[slug]

    def lookup(self, entry_key: str, device_name: str) -> tuple[str, str] | None:
        """(backend, source) of the first table with an entry for this key, or None."""
        for source, entries in (("tune cache", self.user_entries()), ("shipped table",
                                                                       self.shipped_entries(device_name))):
            if entry_key in entries:
                return entries[entry_key]["backend"], source
        return None

    def record(self, entry_key: str, times_ms: Mapping[str, float]) -> str:
        """Write the fastest backend of `times_ms` under `entry_key` to the user's cache (atomically); return it."""
        fastest = min(times_ms, key=times_ms.get)
        entries = self.user_entries()
        entries[entry_key] = {"backend": fastest, "times_ms": {b: round(t, 6) for b, t in times_ms.items()}}
        path = cache_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, suffix=".tmp", delete=False) as f:
            json.dump({"format": "gpuforge tune table, 1", "entries": entries}, f, indent=1, sort_keys=True)
        os.replace(f.name, path)
        for recorded in _forced:
            recorded.append(entry_key)
        return fastest

    def forget(self) -> None:
        """Drop what was read, so the next lookup reads the files again."""
        self._cache.clear()
        self._shipped.clear()


TABLE = AutoTable()


def cuda_event_timer(thunk: Callable[[], object], warmup: int = 3, repeats: int = 10) -> float:
    """Median milliseconds of `thunk` over `repeats` runs, each between two CUDA events, after `warmup` runs."""
    for _ in range(warmup):
        thunk()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        thunk()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(entry_key: str, candidates: Sequence[str], run: Callable[[str], object], timer: Timer | None = None) -> str:
    """Time `run(backend)` for every candidate (torch among them) with `timer` (default: `cuda_event_timer`,
    looked up at the call), record the fastest under `entry_key` and return it."""
    timer = timer or globals()["cuda_event_timer"]
    if "torch" not in candidates:
        raise ValueError(f"candidates: must include 'torch' (the baseline auto is never slower than), got "
                         f"{tuple(candidates)}")
    with torch.no_grad():
        times = {backend: timer(lambda backend=backend: run(backend)) for backend in candidates}
    return TABLE.record(entry_key, times)


def describe(device_name: str | None) -> str:
    """Which source `auto` uses on this device, for `gpuforge info`."""
    if device_name is None:
        return "auto: CPU tensors run the torch backend (no CUDA device; the measured tables are not read)"
    ours = sum(k.endswith("|" + device_name) for k in TABLE.user_entries())
    shipped = len(TABLE.shipped_entries(device_name))
    sources = []
    if ours:
        sources.append(f"the tune cache {cache_path()} ({ours} entries for this device)")
    if shipped:
        sources.append(f"the shipped table {SHIPPED_TABLES / device_slug(device_name) / SHIPPED_NAME} ({shipped})")
    lazily = " GPUFORGE_AUTOTUNE=1: new shapes are timed at first use." if autotune_on() else ""
    if not sources:
        return (f"auto on {device_name}: the documented rule (each op's auto_order), no measurement for this "
                f"device; run `python -m gpuforge tune` or set GPUFORGE_AUTOTUNE=1 to measure.{lazily}")
    return f"auto on {device_name}: measured, from {' then '.join(sources)}; the rule elsewhere.{lazily}"
