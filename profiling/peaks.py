"""The device's measured ceilings, measured once per device and cached in ~/.cache/gpuforge/peaks.json:
copy bandwidth (a large device-to-device copy, bytes read + written) and matrix throughput (a large bf16 GEMM
through cuBLAS on a GPU; fp32 on a CPU). Fractions of peak in every report are against these numbers."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from gpuforge.profiling.timing import time_fn


@dataclass(frozen=True)
class Peaks:
    device_name: str
    copy_gbps: float
    matmul_tflops: float
    matmul_dtype: str


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores)"


def cache_path() -> Path:
    return Path(os.environ.get("GPUFORGE_CACHE", Path.home() / ".cache" / "gpuforge")) / "peaks.json"


def measure(device: torch.device) -> Peaks:
    gpu = device.type == "cuda"
    n = (1 << 28) if gpu else (1 << 24)  # 1 GiB of fp32 on a GPU, 64 MiB on a CPU
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device)
    size, dtype = (8192, torch.bfloat16) if gpu else (1024, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    gemm = time_fn(lambda: a @ b, device)
    return Peaks(device_name(device), 2 * src.numel() * src.element_size() / copy.median_ms / 1e6,
                 2 * size**3 / gemm.median_ms / 1e9, str(dtype).removeprefix("torch."))


def peaks(device: torch.device) -> Peaks:
    """Cached ceilings for this device; measured on first use."""
    path = cache_path()
    cached = json.loads(path.read_text()) if path.exists() else {}
    name = device_name(device)
    if name not in cached:
        cached[name] = asdict(measure(device))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cached, indent=2))
        tmp.replace(path)
    return Peaks(**cached[name])
