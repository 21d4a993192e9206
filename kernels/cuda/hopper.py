"""The switch of the cuda backend's Hopper kernels (csrc/matmul_wgmma.cu, csrc/flash_attention_wgmma.cu: TMA,
wgmma, warp specialisation; sm_90a machine code). They are opt-in until a GPU run has measured them: their
numbers are checked in the SIMT emulator and their SASS (HGMMA, UTMALDG) ahead of time, their speed not yet."""

from __future__ import annotations

import os

import torch


def wgmma_enabled(device: torch.device) -> bool:
    """GPUFORGE_CUDA_WGMMA=1 on a compute capability 9.0 device (sm_90a machine code runs there only)."""
    value = os.environ.get("GPUFORGE_CUDA_WGMMA", "0")
    if value not in ("0", "1"):
        raise ValueError(f"GPUFORGE_CUDA_WGMMA: expected 0 or 1, got {value!r}")
    return value == "1" and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0)


def rows_aligned(*tensors: torch.Tensor) -> bool:
    """Unit stride innermost, every other stride a multiple of 8 elements and the start 16-byte aligned: what a
    tensor map (TMA) and cp.async need of 16-bit operands."""
    return all(t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1]) and t.data_ptr() % 16 == 0
               for t in tensors)
