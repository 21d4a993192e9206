"""Access to the compiled extension gpuforge._C: loading it with a clear error, and the torch -> C++ glue
(element-type codes matching csrc/dtype.h, the raw stream handle of torch's current stream)."""

from __future__ import annotations

import functools
import importlib

import torch

# Codes of csrc/dtype.h's DType enum.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


@functools.cache
def extension():
    """The gpuforge._C module; raises RuntimeError saying why it is missing and how to build it."""
    try:
        return importlib.import_module("gpuforge._C")
    except ImportError as err:
        raise RuntimeError(
            "the cuda backend needs the compiled extension gpuforge._C, which is not built "
            f"({err}). Build it with nvcc on PATH: `GPUFORGE_BUILD_CUDA=1 pip install -e .`"
        ) from err


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def stream_handle(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
