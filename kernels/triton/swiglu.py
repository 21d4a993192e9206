"""Triton SwiGLU: y = silu(gate) · up elementwise, and its backward, one BLOCK_SIZE slice per program.

The forward reads gate and up once and writes y; the backward reads dy, gate and up once and writes both input
gradients, recomputing the sigmoid rather than saving it (σ = sigmoid(gate)):
    d gate = dy · up · σ · (1 + gate · (1 − σ)),   d up = dy · gate · σ.
Arithmetic is fp32, one rounding on store; offsets are int64, so more than 2^31 elements work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc


@triton.jit
def _swiglu_fwd_kernel(
    gate_ptr,  # contiguous
    up_ptr,  # contiguous, gate's shape
    y_ptr,  # output, contiguous
    n_elements,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    dy_ptr,  # upstream gradient, contiguous
    gate_ptr,
    up_ptr,
    dgate_ptr,  # outputs, contiguous
    dup_ptr,
    n_elements,
    BLOCK_SIZE: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    dy = tl.load(dy_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(dgate_ptr + offsets, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)


# 1024 elements over 4 warps = 8 per thread, so fp32 loads compile to 16-byte vectors.
BLOCK_SIZE = 1024
NUM_WARPS = 4


def forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate, up = gate.contiguous(), up.contiguous()
    y = _alloc.empty_like(gate)
    if gate.numel():
        _swiglu_fwd_kernel[(triton.cdiv(gate.numel(), BLOCK_SIZE),)](gate, up, y, gate.numel(),
                                                                     BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
    return y


def backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dy, gate, up = dy.contiguous(), gate.contiguous(), up.contiguous()
    dgate, dup = _alloc.empty_like(gate), _alloc.empty_like(up)
    if gate.numel():
        _swiglu_bwd_kernel[(triton.cdiv(gate.numel(), BLOCK_SIZE),)](dy, gate, up, dgate, dup, gate.numel(),
                                                                     BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
    return dgate, dup


def compile_variants() -> list:
    """The one launch configuration of each kernel, per dtype (kernels/triton/_variants.py)."""
    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    for dtype in ("float32", "float16", "bfloat16"):
        constexprs = {"BLOCK_SIZE": BLOCK_SIZE}
        for kernel in (_swiglu_fwd_kernel, _swiglu_bwd_kernel):
            pointers = {name: dtype for name in kernel.arg_names if name.endswith("_ptr")}
            out.append(Variant("swiglu", kernel, signature(kernel, constexprs, pointers), constexprs, NUM_WARPS, 3,
                               dtype))
    return out
