"""Access to the compiled extension gpuforge._C: loading it with a clear error, and the torch -> C++ glue
(element-type codes matching csrc/dtype.h, the raw stream handle of torch's current stream, a device guard).

Every launch goes through `call`: it makes the tensors' device current for the duration of the call (as
FlashAttention's bindings do with a CUDAGuard), so kernels launched for tensors on GPU 1 run on GPU 1 and on
that device's current stream even when the caller's current device is GPU 0.
"""

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


def call(name: str, device: torch.device, *args):
    """gpuforge._C.<name>(*args, stream) with `device` current and its current stream appended."""
    with torch.cuda.device(device):
        return getattr(extension(), name)(*args, torch.cuda.current_stream(device).cuda_stream)


def query(name: str, *args):
    """A host-side helper of the extension that launches nothing (sizes, device counts)."""
    return getattr(extension(), name)(*args)
