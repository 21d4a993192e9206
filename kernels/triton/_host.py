"""What every Triton host wrapper shares: whether the interpreter runs the kernels, and the operand rule that
works around the interpreter's bf16 gap. Both are read at call time, never at import."""

from __future__ import annotations

import torch

from gpuforge.kernels.backends import triton_interpreter_on

__all__ = ["interpreted", "operand", "upcast_bf16_dot"]


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
