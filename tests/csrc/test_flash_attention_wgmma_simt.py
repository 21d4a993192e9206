"""csrc/flash_attention_wgmma.cu's Hopper attention forward runs on the CPU through the SIMT emulator
(tests/csrc/simt/hopper.h): Q, K and V by TMA into a 2-stage ring guarded by mbarriers, S = Q Kᵀ on wgmma from
128-byte-swizzled shared-memory descriptors, P V on wgmma with P from registers, a producer warpgroup and two
consumers with setmaxnreg, the softmax of the next key tile overlapping the current P V product, and a TMA-store
epilogue. The tensor maps are the launcher's own (tensor_maps.h) through the emulator's cuTensorMapEncodeTiled.

fp16 and bf16; odd lengths (rows and keys past the 128-row tiles), Sq != Sk, GQA and MQA, causal, a sliding
window, rows that see no key, enough key tiles to wrap the ring twice, q strided over heads; outputs poisoned
with NaN. The float64 reference; the output within twice the error of PyTorch's attention computed in the same
dtype. Mutations of the kernel must fail: a wrong value-descriptor offset, no epilogue swizzle, the scores read
before their wgmma completes, P overwritten while P V still reads it, and a producer that waits on the wrong
phase (a deadlock the emulator reports instead of hanging)."""

import ctypes

import pytest
import torch

from gpuforge.kernels import flash_attention as fa
from tests.csrc import simt_build
from tests.csrc.simt_build import DTYPE_CODES, ptr
from tests.helpers import max_rel_error, poison_

D = 128


@pytest.fixture(scope="module")
def lib(simt_lib):
    return simt_lib("flash_attention_wgmma")


def simt_forward(lib, q, k, v, scale, left, right):
    out = poison_(torch.empty(q.shape, dtype=q.dtype))
    lse = poison_(torch.empty(q.shape[:3]))
    sizes = (q.shape[1], k.shape[1], q.shape[2], k.shape[2], D, left, right)
    params = (ctypes.c_longlong * 16)(*sizes, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    rc = lib.gf_simt_attention_forward_wgmma(DTYPE_CODES[q.dtype], ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse),
                                              ctypes.c_longlong(q.shape[0]), params, ctypes.c_float(scale))
    return rc, out, lse


def _inputs(dtype, b, hq, hkv, sq, sk, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, D, generator=gen).to(dtype).transpose(1, 2)  # (B, S, H, D) memory
    k, v = (torch.randn(b, hkv, sk, D, generator=gen).to(dtype) for _ in range(2))
    return q, k, v


# (B, Hq, Hkv, Sq, Sk, causal, window)
CASES = [
    (1, 2, 1, 1, 3, False, None),         # one row, GQA 2
    (1, 2, 2, 131, 133, True, None),      # causal, rows and keys past the 128 tiles
    (2, 4, 1, 45, 300, False, None),      # MQA, three key tiles: the ring wraps, phases flip
    (1, 2, 1, 200, 150, True, None),      # Sq > Sk causal: the first 50 rows see no key
    (1, 2, 2, 140, 390, True, (70, 0)),   # sliding window, bottom-right aligned, tiles skipped on the left
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-Sq{}-Sk{}-c{}-w{}".format(*c))
def test_wgmma_attention_forward_matches_float64(lib, case, dtype):
    b, hq, hkv, sq, sk, causal, window = case
    left, right = fa._window(window, causal)
    scale = D ** -0.5
    q, k, v = _inputs(dtype, b, hq, hkv, sq, sk, sum(case[:5]))
    rc, out, lse = simt_forward(lib, q, k, v, scale, left, right)
    assert rc == 0
    ref_out, ref_lse = fa.attention_math(q.double(), k.double(), v.double(), scale, left, right)
    torch_out, _ = fa.attention_math(q, k, v, scale, left, right)  # PyTorch in the same dtype
    err, torch_err = max_rel_error(out, ref_out), max_rel_error(torch_out, ref_out)
    assert err <= 2 * torch_err + 1e-6, f"{case}: error {err:.3e}, PyTorch's {dtype} attention {torch_err:.3e}"
    seen = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), seen), "rows that see no key must have LSE -inf"
    assert (lse.double() - ref_lse)[seen].abs().max() < 1e-4
    assert not out.isnan().any()


MUTATIONS = {
    "value descriptor leading offset": ("values + 16 * 128 * kk, kFa3BoxBytes, 1024",
                                        "values + 16 * 128 * kk, kFa3BoxBytes / 2, 1024"),
    "epilogue swizzle": ("swizzle_128b(row * 128 + (col % 64) * 2)", "(row * 128 + (col % 64) * 2)"),
    "scores read before their wgmma completes": ("    wgmma_wait<1>();  // S of the next tile", "    // S"),
    "P overwritten while P V reads it": (
        "    wgmma_wait<0>();\n    pin_registers(o);  // P V is done",
        "    rescale_and_pack();\n    wgmma_wait<0>();\n    pin_registers(o);  // P V is done"),
    "producer waits on the wrong phase": ("mbarrier_wait(&v_empty[stage], phase ^ 1);",
                                          "mbarrier_wait(&v_empty[stage], phase);"),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_mutated_kernel_fails(tmp_path, capfd, name):
    original, mutated = MUTATIONS[name]
    lib = simt_build.build("flash_attention_wgmma", tmp_path,
                           simt_build.replacing("flash_attention_wgmma.cu", original, mutated))
    q, k, v = _inputs(torch.bfloat16, 1, 2, 1, 130, 300, 0)
    rc, out, _ = simt_forward(lib, q, k, v, D ** -0.5, -1, 0)
    if name == "producer waits on the wrong phase":  # stopped with an error instead of hanging
        assert rc == 2 and "deadlock: an mbarrier wait never completes" in capfd.readouterr().err
    else:
        assert rc == 0
        ref, _ = fa.attention_math(q.double(), k.double(), v.double(), D ** -0.5, -1, 0)
        err = max_rel_error(out, ref)
        assert err > 0.05 or out.isnan().any(), f"the mutated kernel still matches (error {err:.2e})"
