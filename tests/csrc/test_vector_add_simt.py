"""csrc/vector_add.cu's 16-byte and scalar kernels, run on the CPU through the SIMT emulator (tests/csrc/simt/).

The launcher picks the 16-byte kernel when every pointer is 16-byte aligned and the scalar kernel otherwise;
both run here, over every dtype, lengths that are not multiples of a chunk or a block (the vector kernel's tail
path), and a capped grid that makes the grid-stride loops turn; outputs poisoned with NaN, compared with the
float64 sum and, bit for bit, with torch's own fp32 add rounded once to the dtype (what the kernel computes)."""

import ctypes

import pytest
import torch

from gpuforge.kernels.vector_add import vector_add_reference
from tests.csrc.simt_build import DTYPE_CODES, ptr
from tests.helpers import REL_TOL, assert_close_rel, poison_


@pytest.fixture(scope="module")
def lib(simt_lib):
    return simt_lib("vector_add")


def simt_vector_add(lib, a, b, out, max_blocks):
    status = lib.gf_simt_vector_add(DTYPE_CODES[a.dtype], ptr(a), ptr(b), ptr(out), ctypes.c_longlong(a.numel()),
                                    ctypes.c_longlong(max_blocks))
    assert status == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("aligned", [True, False], ids=["vec16", "scalar"])
@pytest.mark.parametrize(("n", "max_blocks"), [(1, 1 << 30), (7, 1 << 30), (1031, 1 << 30), (3001, 2)])
def test_vector_add_matches_float64(lib, n, max_blocks, aligned, dtype):
    gen = torch.Generator().manual_seed(n)
    offset = 0 if aligned else 1  # one element past a 16-byte boundary: the launcher takes the scalar kernel
    a, b = (torch.randn(n + offset, generator=gen).to(dtype)[offset:] for _ in range(2))
    out = poison_(torch.empty(n + offset, dtype=dtype))[offset:]
    assert (a.data_ptr() % 16 == 0) == aligned
    simt_vector_add(lib, a, b, out, max_blocks)
    assert_close_rel(out, vector_add_reference(a.double(), b.double()), REL_TOL[dtype], f"n={n}")
    assert torch.equal(out, vector_add_reference(a.float(), b.float()).to(dtype)), "one rounding of the fp32 sum"
