"""The cupy backend: csrc/*.cu compiled at run time by NVRTC through cupy.RawModule, launched on torch's
current stream. The same sources as the AOT extension; host-only code there is hidden from NVRTC by
`#ifndef __CUDACC_RTC__`."""

from __future__ import annotations

import functools
import os
from importlib import resources
from pathlib import Path

import torch

# C++ names of the element types, for template name expressions such as "gpuforge::k<__half>".
CPP_TYPES = {torch.float32: "float", torch.float16: "__half", torch.bfloat16: "__nv_bfloat16"}


def csrc_dir() -> str:
    return str(resources.files("gpuforge.csrc"))


def nvrtc_options() -> tuple[str, ...]:
    """NVRTC flags: C++17, csrc/ for our headers, the toolkit's include folder for cuda_fp16.h / cuda_bf16.h."""
    options = ["-std=c++17", f"-I{csrc_dir()}"]
    cuda_include = Path(os.environ.get("CUDA_HOME", os.environ.get("CUDA_PATH", "/usr/local/cuda"))) / "include"
    if (cuda_include / "cuda_fp16.h").exists():
        options.append(f"-I{cuda_include}")
    return tuple(options)


@functools.cache
def module(source: str, name_expressions: tuple[str, ...]):
    """Compile csrc/`source` once per process with the kernels named by `name_expressions` instantiated."""
    import cupy

    code = (resources.files("gpuforge.csrc") / source).read_text()
    return cupy.RawModule(code=code, options=nvrtc_options(), name_expressions=name_expressions)


def kernel(source: str, name_expressions: tuple[str, ...], name: str):
    return module(source, name_expressions).get_function(name)


def as_cupy(t: torch.Tensor):
    """A zero-copy cupy view of a CUDA tensor; bfloat16 (unknown to cupy) travels as int16 bits."""
    import cupy

    return cupy.asarray(t.view(torch.int16) if t.dtype == torch.bfloat16 else t)


def launch(kern, grid: tuple[int, ...], block: tuple[int, ...], args: tuple, device: torch.device,
           shared_mem: int = 0) -> None:
    """Launch `kern` on torch's current stream of `device`."""
    import cupy

    with cupy.cuda.Device(device.index or 0), cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream):
        kern(grid, block, args, shared_mem=shared_mem)
