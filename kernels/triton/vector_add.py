"""Triton vector add: each program adds one BLOCK_SIZE slice; fp32 arithmetic, one rounding on store."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc


@triton.jit
def _vector_add_kernel(
    a_ptr,  # first input, contiguous
    b_ptr,  # second input, contiguous
    out_ptr,  # output, contiguous
    n_elements,  # total elements; offsets are int64 so > 2^31 elements work
    BLOCK_SIZE: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK_SIZE
    offsets = start + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    a = tl.load(a_ptr + offsets, mask=mask)
    b = tl.load(b_ptr + offsets, mask=mask)
    total = a.to(tl.float32) + b.to(tl.float32)
    tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)


# 1024 elements over 4 warps = 8 per thread: 32 bytes of fp32, so the loads compile to 16-byte vectors.
BLOCK_SIZE = 1024
NUM_WARPS = 4


def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.contiguous(), b.contiguous()
    out = _alloc.empty_like(a)
    n = a.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK_SIZE),)
        _vector_add_kernel[grid](a, b, out, n, BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
    return out


def compile_variants() -> list:
    """The one launch configuration, per dtype (kernels/triton/_variants.py)."""
    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    for dtype in ("float32", "float16", "bfloat16"):
        constexprs = {"BLOCK_SIZE": BLOCK_SIZE}
        sig = signature(_vector_add_kernel, constexprs, {"a_ptr": dtype, "b_ptr": dtype, "out_ptr": dtype})
        out.append(Variant("vector_add", _vector_add_kernel, sig, constexprs, NUM_WARPS, 3, dtype))
    return out
