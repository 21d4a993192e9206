"""csrc/int4_matmul.cu's tiled kernel (any M) and decode kernel (M <= 16, split-K), run on the CPU through the
SIMT emulator (tests/csrc/simt/). The decode's int4 -> fp16 bit trick goes through lop3, which the emulator
evaluates from its truth table exactly as the GPU does, and fp16 half2 arithmetic rounded once per lane.

fp16 and bf16 activations with fp32, fp16 and bf16 scales; every code 0..15 and zero point 0..15; M, N and K
not multiples of the tiles; each of the decode's row counts (1, 2, 4, 8, 16 rows per warp) and split-K 1 to 4;
outputs (and the split-K workspace) poisoned with NaN; the float64 reference dequantize -> matmul."""

import ctypes

import pytest
import torch

from gpuforge.kernels.int4_matmul import int4_matmul_reference
from tests.csrc.simt_build import DTYPE_CODES, ptr
from tests.helpers import REL_TOL, assert_close_rel, poison_


@pytest.fixture(scope="module")
def lib(simt_lib):
    return simt_lib("int4_matmul")


def simt_int4_matmul(lib, x, qweight, scales, zeros, group_size, split_k):
    m, k = x.shape
    n = qweight.shape[0]
    out = poison_(torch.empty(m, n, dtype=x.dtype))
    workspace = poison_(torch.empty(max(split_k, 1), m, n))
    sizes = (ctypes.c_longlong(v) for v in (m, n, k, group_size, split_k))
    assert lib.gf_simt_int4_matmul(DTYPE_CODES[x.dtype], DTYPE_CODES[scales.dtype], ptr(x), ptr(qweight),
                                   ptr(scales), ptr(zeros), ptr(out), ptr(workspace), *sizes) == 0
    return out


# (M, N, K, group_size, split_k): split_k 0 is the tiled kernel, >= 1 the decode kernel.
CASES = [
    (1, 1, 2, 2, 0),
    (3, 67, 96, 32, 0),
    (70, 130, 64, 64, 0),     # 2 x 3 tiles of 64 x 64
    (1, 13, 256, 64, 1),      # decode, one row; N = 13: the second block's last 3 warps have no channel
    (2, 11, 96, 32, 3),       # 2 rows per warp, 3 K slices of 32
    (2, 3, 2048, 128, 1),     # every lane loops over 2 chunks of 32 codes
    (3, 29, 512, 128, 4),     # 4 rows per warp (one unused), 4 K slices of 128
    (7, 8, 128, 32, 2),       # 8 rows per warp
    (16, 5, 64, 32, 1),       # 16 rows per warp
]


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("x_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "M{}-N{}-K{}-G{}-split{}".format(*c))
def test_int4_matmul_matches_float64(lib, case, x_dtype, scale_dtype):
    m, n, k, group_size, split_k = case
    gen = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=gen).to(x_dtype)
    qweight = torch.randint(0, 256, (n, k // 2), generator=gen, dtype=torch.uint8)
    zeros = torch.randint(0, 16, (n, k // group_size), generator=gen, dtype=torch.uint8)
    scales = (0.02 + 0.1 * torch.rand(n, k // group_size, generator=gen)).to(scale_dtype)
    out = simt_int4_matmul(lib, x, qweight, scales, zeros, group_size, split_k)
    ref = int4_matmul_reference(x.double(), qweight, scales, zeros, group_size)
    assert_close_rel(out, ref, REL_TOL[x_dtype], f"out {case}")
