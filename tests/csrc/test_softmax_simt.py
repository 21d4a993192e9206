"""csrc/softmax.cu's forward and backward kernels, run on the CPU through the SIMT emulator (tests/csrc/simt/).

Row lengths pick each of the launcher's kernels (warp per row; block per row with the row cached in
registers; block per row streaming with the online max/sum), with and without 16-byte vectors (n and the row
stride multiples of 16 bytes or not), strided rows, rows partly masked with -inf, row counts that leave warps
of the last block idle; outputs poisoned with NaN, compared with the float64 torch reference."""

import ctypes

import pytest
import torch

from gpuforge.kernels.softmax import softmax_backward_reference, softmax_reference
from tests.csrc.simt_build import DTYPE_CODES, ptr
from tests.helpers import REL_TOL, assert_close_rel, poison_


@pytest.fixture(scope="module")
def lib(simt_lib):
    return simt_lib("softmax")


def simt_forward(lib, x):
    y = poison_(torch.empty(x.shape, dtype=x.dtype))
    rows, n = x.shape
    assert lib.gf_simt_softmax_forward(DTYPE_CODES[x.dtype], ptr(x), ctypes.c_longlong(x.stride(0)), ptr(y),
                                       ctypes.c_longlong(rows), ctypes.c_longlong(n)) == 0
    return y


def simt_backward(lib, dy, y):
    dx = poison_(torch.empty(y.shape, dtype=y.dtype))
    rows, n = y.shape
    assert lib.gf_simt_softmax_backward(DTYPE_CODES[y.dtype], ptr(dy), ctypes.c_longlong(dy.stride(0)), ptr(y),
                                        ptr(dx), ctypes.c_longlong(rows), ctypes.c_longlong(n)) == 0
    return dx


# (rows, n, row padding, masked): padding 0 is contiguous; 8 keeps 16-byte rows for every dtype, 3 breaks them.
CASES = [
    (3, 1, 0, False),       # warp kernel, one element per row
    (5, 97, 3, True),       # warp kernel, scalar, 4 chunks per lane, the last block with 3 idle warps
    (6, 40, 8, False),      # warp kernel, 16-byte vectors
    (2, 1000, 0, True),     # block kernel, scalar, cached (2 chunks per thread; the backward too)
    (2, 2056, 8, False),    # block kernel, 16-byte vectors, cached
    (1, 4099, 0, True),     # block kernel, scalar, streaming (the backward streams from n > 2048)
    (1, 32776, 0, False),   # block kernel, 16-byte vectors, streaming for every dtype
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "rows{}-n{}-pad{}-masked{}".format(*c))
def test_forward_and_backward_match_float64(lib, case, dtype):
    rows, n, pad, masked = case
    gen = torch.Generator().manual_seed(rows * n)
    x = (3 * torch.randn(rows, n + pad, generator=gen)).to(dtype)[:, :n]
    if masked:  # a few -inf per row (never a whole row: that is NaN for torch and the kernel alike)
        x[:, 1::7] = float("-inf")
    dy = torch.randn(rows, n + pad, generator=gen).to(dtype)[:, :n]
    tol = REL_TOL[dtype]

    y = simt_forward(lib, x)
    assert_close_rel(y, softmax_reference(x.double()), tol, f"y {case}")
    dx = simt_backward(lib, dy, y)
    assert_close_rel(dx, softmax_backward_reference(dy.double(), y.double()), tol, f"dx {case}")
