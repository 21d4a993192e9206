"""Deterministic column sums shared by the normalisation backwards (rms_norm, layer_norm): each program of a
backward keeps its band of rows' share of a weight gradient in fp32 and stores it as one partial row; the kernel
here sums the partial rows top to bottom, the same order every run, so the gradient is bit-identical across runs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gpuforge.kernels.triton._host import interpreted


@triton.jit
def _sum_partials_kernel(
    partial_ptr,  # fp32 (n_partials, n) partial column sums
    out_ptr,  # output (n,) in the gradient's dtype
    n_partials,
    n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    """Each program sums a BLOCK_SIZE slice of columns over all partial rows, top to bottom, in fp32 registers."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    total = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    for p in range(0, n_partials):
        total += tl.load(partial_ptr + p * n_cols + cols, mask=mask, other=0.0)
    tl.store(out_ptr + cols, total.to(out_ptr.dtype.element_ty), mask=mask)


SUM_BLOCK = 256
# Under the interpreter a few programs still exercise the band split and the second pass.
INTERPRETER_PROGRAMS = 4


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def bands(rows: int, device: torch.device) -> int:
    """How many programs (bands of rows) a backward launches: a few per SM, enough to fill the GPU and few
    enough that the second pass reads little."""
    if device.type != "cuda" or interpreted():
        return max(1, min(rows, INTERPRETER_PROGRAMS))
    return max(1, min(rows, 4 * _sm_count(device.index or 0)))


def sum_partials_variants(op: str) -> list:
    """The partial-row sum's one launch configuration per output dtype, for the compile_variants of the ops that
    use it (kernels/triton/_variants.py)."""
    from gpuforge.kernels.triton._variants import Variant, signature

    constexprs = {"BLOCK_SIZE": SUM_BLOCK}
    return [Variant(op, _sum_partials_kernel, signature(_sum_partials_kernel, constexprs,
                                                        {"partial_ptr": "float32", "out_ptr": dtype},
                                                        generic=("n_partials",)),
                    constexprs, 4, 3, f"{dtype} BLOCK_SIZE={SUM_BLOCK}")
            for dtype in ("float32", "float16", "bfloat16")]


def sum_partials(partial: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out (n,) = partial (n_partials, n) summed over its rows in fixed order (fp32, rounded once on store)."""
    n = partial.shape[1]
    _sum_partials_kernel[(triton.cdiv(n, SUM_BLOCK),)](partial, out, partial.shape[0], n, BLOCK_SIZE=SUM_BLOCK)
    return out
