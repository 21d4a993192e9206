"""csrc/matmul.cu's tiled kernel (every dtype, any strides), run on the CPU through the SIMT emulator
(tests/csrc/simt/). The tensor-core kernel is inline PTX the emulator cannot run; the tiled kernel is what
fp32, strided and unaligned operands get on a GPU.

Sizes that are not multiples of the 64x64x16 tiles (1, primes, one past a tile), a transposed A or B, a
broadcast B (batch stride 0), several batches; output poisoned with NaN; the float64 torch reference."""

import ctypes

import pytest
import torch

from gpuforge.kernels.matmul import matmul_reference
from tests.csrc.simt_build import DTYPE_CODES, ptr
from tests.helpers import REL_TOL, assert_close_rel, poison_


@pytest.fixture(scope="module")
def lib(simt_lib):
    return simt_lib("matmul")


def simt_matmul(lib, a, b):
    batch, m, k = a.shape
    n = b.shape[2]
    c = poison_(torch.empty(batch, m, n, dtype=a.dtype))
    args = (ctypes.c_longlong(v) for v in (m, n, k, batch, *a.stride(), *b.stride()))
    assert lib.gf_simt_matmul_tiled(DTYPE_CODES[a.dtype], ptr(a), ptr(b), ptr(c), *args) == 0
    return c


def _operand(gen, dtype, batch, rows, cols, layout):
    if layout == "t":  # stored transposed: unit stride along the rows
        return torch.randn(batch, cols, rows, generator=gen).to(dtype).transpose(1, 2)
    if layout == "broadcast":  # one matrix for every batch: batch stride 0
        return torch.randn(1, rows, cols, generator=gen).to(dtype).expand(batch, rows, cols)
    return torch.randn(batch, rows, cols, generator=gen).to(dtype)


# (batch, M, N, K, layout of A, layout of B)
CASES = [
    (1, 1, 1, 1, "n", "n"),
    (2, 67, 13, 29, "n", "t"),
    (3, 64, 130, 17, "t", "broadcast"),
    (1, 97, 65, 100, "t", "t"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-M{}-N{}-K{}-a{}-b{}".format(*c))
def test_tiled_matmul_matches_float64(lib, case, dtype):
    batch, m, n, k, a_layout, b_layout = case
    gen = torch.Generator().manual_seed(m * n + k)
    a = _operand(gen, dtype, batch, m, k, a_layout)
    b = _operand(gen, dtype, batch, k, n, b_layout)
    c = simt_matmul(lib, a, b)
    assert_close_rel(c, matmul_reference(a.double(), b.double()), REL_TOL[dtype], f"c {case}")
