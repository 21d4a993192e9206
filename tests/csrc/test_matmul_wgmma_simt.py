"""csrc/matmul_wgmma.cu's Hopper kernel runs on the CPU through the SIMT emulator (tests/csrc/simt/hopper.h):
TMA loads into a 4-stage ring guarded by mbarriers, wgmma m64n128k16 from 128-byte-swizzled shared-memory
descriptors (A K-major, B MN-major), a producer warpgroup and two consumers with setmaxnreg, persistent tiles
(fewer blocks than tiles, so stages and phases carry over from tile to tile) and a TMA-store epilogue through
shared memory. The tensor maps are the launcher's own (tensor_maps.h) through the emulator's
cuTensorMapEncodeTiled.

Sizes cross the 128x128x64 tiles in every direction (M odd, N and K multiples of 8 only: the launcher's
preconditions), a broadcast B, several batches; output poisoned with NaN; the float64 reference, and at most
twice the error of PyTorch's own matmul in the same dtype. Mutations of the kernel must fail: a wrong
descriptor offset, a wrong epilogue swizzle, accumulators read before their wgmma completes, and a producer
that waits on the wrong phase (a deadlock the emulator reports instead of hanging)."""

import ctypes

import pytest
import torch

from gpuforge.kernels.matmul import matmul_reference
from tests.csrc import simt_build
from tests.csrc.simt_build import DTYPE_CODES, ptr
from tests.helpers import max_rel_error, poison_


@pytest.fixture(scope="module")
def lib(simt_lib):
    return simt_lib("matmul_wgmma")


def simt_matmul_wgmma(lib, a, b, blocks):
    batch, m, k = a.shape
    n = b.shape[2]
    c = poison_(torch.empty(batch, m, n, dtype=a.dtype))
    args = (ctypes.c_longlong(v) for v in (m, n, k, batch, a.stride(0), a.stride(1), b.stride(0), b.stride(1)))
    rc = lib.gf_simt_matmul_wgmma(DTYPE_CODES[a.dtype], ptr(a), ptr(b), ptr(c), *args, blocks)
    return rc, c


def _operands(dtype, batch, m, n, k, broadcast_b, seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, m, k, generator=gen).to(dtype)
    b = torch.randn(1 if broadcast_b else batch, k, n, generator=gen).to(dtype).expand(batch, k, n)
    return a, b


# (batch, M, N, K, broadcast B, persistent blocks)
CASES = [(1, 1, 8, 8, False, 1), (2, 131, 136, 72, False, 3), (1, 200, 264, 200, False, 2),
         (3, 37, 16, 136, True, 2)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-M{}-N{}-K{}-bcast{}-blocks{}".format(*c))
def test_wgmma_matmul_matches_float64(lib, case, dtype):
    batch, m, n, k, broadcast, blocks = case
    a, b = _operands(dtype, batch, m, n, k, broadcast, m + n * k)
    rc, c = simt_matmul_wgmma(lib, a, b, blocks)
    assert rc == 0
    ref = matmul_reference(a.double(), b.double())
    err, torch_err = max_rel_error(c, ref), max_rel_error(torch.matmul(a, b), ref)
    assert err <= 2 * torch_err + 1e-7, f"{case}: error {err:.3e}, PyTorch's {dtype} matmul {torch_err:.3e}"


MUTATIONS = {
    "B leading offset": ("smem_descriptor_sw128(b_rows + 16 * 128 * k16, kWgmmaHalfBytesB, 1024)",
                         "smem_descriptor_sw128(b_rows + 16 * 128 * k16, kWgmmaHalfBytesB / 2, 1024)"),
    "epilogue swizzle": ("swizzle_128b(row * 128 + (col % 64) * 2)", "(row * 128 + (col % 64) * 2)"),
    "no wait before the epilogue": ("    wgmma_wait<0>();\n", "\n"),
    "producer waits on the wrong phase": ("mbarrier_wait(&empty[stage], phase ^ 1);",
                                          "mbarrier_wait(&empty[stage], phase);"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_mutated_kernel_fails(tmp_path, capfd, name):
    original, mutated = MUTATIONS[name]

    lib = simt_build.build("matmul_wgmma", tmp_path, simt_build.replacing("matmul_wgmma.cu", original, mutated))
    a, b = _operands(torch.bfloat16, 1, 130, 136, 136, False, 0)
    rc, c = simt_matmul_wgmma(lib, a, b, 2)
    stopped = {"producer waits on the wrong phase": "deadlock: an mbarrier wait never completes",
               "no wait before the epilogue": "wgmma operations never waited for"}
    if name in stopped:  # the emulator stops the launch with an error instead of hanging or reading garbage
        assert rc == 2 and stopped[name] in capfd.readouterr().err
    else:
        assert rc == 0
        err = max_rel_error(c, matmul_reference(a.double(), b.double()))
        assert err > 0.1, f"the mutated kernel still matches (error {err:.2e})"
