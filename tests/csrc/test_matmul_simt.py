"""csrc/matmul.cu's kernels run on the CPU through the SIMT emulator (tests/csrc/simt/): the tiled kernel
(every dtype, any strides: what fp32, strided and unaligned operands get on a GPU) and the tensor-core kernel
(fp16/bf16: mma.sync m16n8k16 fed by ldmatrix from a 3-stage cp.async pipeline, emulated instruction by
instruction by ptx.h), including a mutation check: a fragment row moved by one must fail.

Sizes that are not multiples of the 64x64x16 tiles (1, primes, one past a tile), a transposed A or B, a
broadcast B (batch stride 0), several batches; output poisoned with NaN; the float64 torch reference."""

import ctypes

import pytest
import torch

from gpuforge.kernels.matmul import matmul_reference
from tests.csrc.simt_build import DTYPE_CODES, ptr
from tests.helpers import REL_TOL, assert_close_rel, max_rel_error, poison_


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


def simt_matmul_mma(lib, a, b):
    batch, m, k = a.shape
    n = b.shape[2]
    c = poison_(torch.empty(batch, m, n, dtype=a.dtype))
    args = (ctypes.c_longlong(v) for v in (m, n, k, batch, a.stride(0), a.stride(1), b.stride(0), b.stride(1)))
    assert lib.gf_simt_matmul_mma(DTYPE_CODES[a.dtype], ptr(a), ptr(b), ptr(c), *args) == 0
    return c


# (batch, M, N, K, broadcast B): the launcher's preconditions (K, N multiples of 8, unit inner strides); M odd,
# tiles of 128 x 128 x 32 crossed in every direction, a K tail shorter than a slab, a broadcast B
MMA_CASES = [(1, 1, 8, 8, False), (2, 131, 136, 72, False), (1, 64, 264, 40, False), (3, 37, 16, 200, True)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MMA_CASES, ids=lambda c: "B{}-M{}-N{}-K{}-bcast{}".format(*c))
def test_tensor_core_matmul_matches_float64(lib, case, dtype):
    batch, m, n, k, broadcast = case
    gen = torch.Generator().manual_seed(m + n * k)
    a = _operand(gen, dtype, batch, m, k, "n")
    b = _operand(gen, dtype, batch, k, n, "broadcast" if broadcast else "n")
    c = simt_matmul_mma(lib, a, b)
    assert_close_rel(c, matmul_reference(a.double(), b.double()), REL_TOL[dtype], f"c {case}")


def test_a_fragment_row_moved_by_one_fails(tmp_path):
    """The mutation check: ldmatrix row addresses off by one row in the kernel give a wrong product."""
    from tests.csrc import simt_build

    original = "const int frag_row = (lane % 8) + 8 * ((lane / 8) % 2);"
    mutated = "const int frag_row = ((lane + 1) % 8) + 8 * ((lane / 8) % 2);"

    lib = simt_build.build("matmul", tmp_path, simt_build.replacing("matmul.cu", original, mutated))
    gen = torch.Generator().manual_seed(0)
    a, b = (_operand(gen, torch.float16, 1, *shape, "n") for shape in ((64, 32), (32, 64)))
    err = max_rel_error(simt_matmul_mma(lib, a, b), matmul_reference(a.double(), b.double()))
    assert err > 0.1, f"the mutated kernel still matches (error {err:.2e})"
