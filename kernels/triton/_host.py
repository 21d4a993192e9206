"""What every Triton host wrapper shares: whether the interpreter runs the kernels, the operand rule that works
around the interpreter's bf16 gap, and whether the tensor-descriptor (TMA) kernels are switched on. All are
read at call time, never at import."""

from __future__ import annotations

import os

import torch

from gpuforge.kernels.backends import triton_interpreter_on

__all__ = ["interpreted", "operand", "tma_enabled", "upcast_bf16_dot"]


def interpreted() -> bool:
    """True when the kernels run in the Triton interpreter (TRITON_INTERPRET=1), on CPU tensors."""
    return triton_interpreter_on()


def upcast_bf16_dot(dtype: torch.dtype) -> bool:
    """Whether a kernel should upcast bf16 tiles to fp32 before tl.dot: Triton 3.9's interpreter multiplies bf16
    tiles as raw integer bits (results ~1e9 off), while fp32 products of bf16 values are exact, so the upcast
    gives the sums a GPU's bf16 tensor cores give. On a GPU the dot stays bf16."""
    return dtype == torch.bfloat16 and interpreted()


def operand(t: torch.Tensor) -> torch.Tensor:
    """A kernel operand with unit stride along its last dim; under the interpreter a bf16 tensor goes in as an
    exact fp32 copy (see `upcast_bf16_dot`), outputs keep the caller's dtype."""
    if upcast_bf16_dot(t.dtype):
        return t.float()
    return t if t.stride(-1) == 1 else t.contiguous()


def tma_enabled(device: torch.device) -> bool:
    """Whether the host wrappers take their tensor-descriptor (TMA) kernels on `device`: sm_90 or later, and
    GPUFORGE_TRITON_TMA=1. Opt-in until a GPU run has checked them; their numbers are checked in the
    interpreter and their SASS (HGMMA, UTMALDG) ahead of time."""
    value = os.environ.get("GPUFORGE_TRITON_TMA", "0")
    if value not in ("0", "1"):
        raise ValueError(f"GPUFORGE_TRITON_TMA: expected 0 or 1, got {value!r}")
    return value == "1" and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
