"""csrc/flash_attention.cu's forwards (the row-per-warp baseline and the tensor-core FlashAttention-2 kernel)
and csrc/flash_attention_bwd.cu's backward, run on the CPU.

No GPU runs in CI, so the kernels' own code (not a Python re-telling of it) is compiled by g++ against the SIMT
emulator in tests/csrc/simt/ (each CUDA thread a fiber, warp shuffles and barriers emulated) and its outputs
and gradients are compared with the float64 math reference: every dtype, GQA ratios 1, 2 and 8, Sq != Sk,
causal and windowed, odd lengths and head dims, rows that see no key, strided inputs, outputs poisoned. The
tensor-core kernel's mma.sync / ldmatrix / cp.async run in the emulator's PTX (ptx.h); a K fragment row moved by
one in it must fail."""

import ctypes

import pytest
import torch

from gpuforge.kernels import flash_attention as fa
from tests.csrc.simt_build import DTYPE_CODES, ptr
from tests.helpers import REL_TOL, assert_close_rel, max_rel_error, poison_


@pytest.fixture(scope="module")
def simt(simt_lib):
    return simt_lib("attention")


def _params(q, k, v, left, right):
    sizes = (q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], left, right)
    return (ctypes.c_longlong * 16)(*sizes, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3])


def simt_forward(lib, q, k, v, scale, left, right):
    out = poison_(torch.empty_like(q, memory_format=torch.contiguous_format))
    lse = poison_(torch.empty(q.shape[:3]))
    status = lib.gf_simt_attention_forward(DTYPE_CODES[q.dtype], ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse),
                                           ctypes.c_longlong(q.shape[0]), _params(q, k, v, left, right),
                                           ctypes.c_float(scale))
    assert status == 0
    return out, lse


def simt_backward(lib, q, k, v, out, dout, lse, dlse, scale, left, right):
    dq, dk, dv = (poison_(torch.empty_like(t, memory_format=torch.contiguous_format)) for t in (q, k, v))
    delta = poison_(torch.empty(q.shape[:3]))
    status = lib.gf_simt_attention_backward(
        DTYPE_CODES[q.dtype], *(ptr(t) for t in (q, k, v, out, dout, lse, dlse, dq, dk, dv, delta)),
        ctypes.c_longlong(q.shape[0]), _params(q, k, v, left, right), ctypes.c_float(scale))
    assert status == 0
    return dq, dk, dv


# (B, Hq, Hkv, Sq, Sk, D, causal, window)
CASES = [
    (1, 1, 1, 1, 3, 32, False, None),
    (2, 4, 2, 17, 23, 32, False, None),   # GQA 2, Sq < Sk
    (1, 8, 1, 19, 19, 40, True, None),    # MQA (ratio 8), odd head dim
    (1, 2, 2, 13, 29, 64, True, (5, 0)),  # sliding window, bottom-right aligned
    (1, 2, 1, 9, 5, 96, True, None),      # Sq > Sk causal: the first 4 rows see no key
    (1, 2, 2, 7, 11, 128, False, (3, 2)),
    (1, 1, 1, 5, 6, 256, False, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-Sq{}-Sk{}-D{}-c{}-w{}".format(*c))
def test_forward_and_backward_match_float64(simt, case, dtype):
    b, hq, hkv, sq, sk, d, causal, window = case
    left, right = fa._window(window, causal)
    scale = d ** -0.5
    gen = torch.Generator().manual_seed(sum(case[:6]))
    make = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    q = make(b, sq, hq, d).transpose(1, 2)  # (B, S, H, D) memory: strided over heads and rows
    k, v = make(b, hkv, sk, d), make(b, hkv, sk, d)
    dout, dlse = make(b, hq, sq, d), torch.randn(b, hq, sq, generator=gen)

    out, lse = simt_forward(simt, q, k, v, scale, left, right)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref_out, ref_lse = fa.attention_math(q64, k64, v64, scale, left, right)
    tol = REL_TOL[dtype]
    assert_close_rel(out, ref_out, tol, f"out {case}")
    assert torch.equal(lse.isinf(), ref_lse.isinf()), "rows that see no key must have LSE -inf"
    assert_close_rel(lse.nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0), 1e-5, f"lse {case}")

    grads = simt_backward(simt, q, k, v, out, dout, lse, dlse, scale, left, right)
    expected = fa.attention_math_backward(dout.double(), dlse.double(), q64, k64, v64, ref_out, ref_lse, scale,
                                          left, right)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, expected, strict=True):
        assert_close_rel(got, ref, tol, f"{name} {case}")


def test_emulated_backward_agrees_with_autograd_of_the_math(simt):
    """The hand-derived reference backward is itself checked here against torch autograd on float64."""
    gen = torch.Generator().manual_seed(7)
    q, k, v, dout = (torch.randn(1, h, n, 32, generator=gen) for h, n in ((4, 11), (2, 14), (2, 14), (4, 11)))
    out, lse = simt_forward(simt, q, k, v, 0.2, -1, 0)
    dq, dk, dv = simt_backward(simt, q, k, v, out, dout, lse, torch.zeros_like(lse), 0.2, -1, 0)
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = fa.attention_math(q64, k64, v64, 0.2, -1, 0)
    ref.backward(dout.double())
    for name, got, expected in zip(("dq", "dk", "dv"), (dq, dk, dv), (q64.grad, k64.grad, v64.grad), strict=True):
        assert_close_rel(got, expected, REL_TOL[torch.float32], name)


def simt_forward_mma(lib, q, k, v, scale, left, right):
    out = poison_(torch.empty_like(q, memory_format=torch.contiguous_format))
    lse = poison_(torch.empty(q.shape[:3]))
    status = lib.gf_simt_attention_forward_mma(DTYPE_CODES[q.dtype], ptr(q), ptr(k), ptr(v), ptr(out), ptr(lse),
                                               ctypes.c_longlong(q.shape[0]), _params(q, k, v, left, right),
                                               ctypes.c_float(scale))
    assert status == 0
    return out, lse


# (B, Hq, Hkv, Sq, Sk, D, causal, window): D 64 and 128 (the kernel's), 64-row tiles crossed, GQA, Sq != Sk,
# a sliding window, the first rows of a causal Sq > Sk seeing no key
MMA_CASES = [
    (1, 2, 1, 70, 130, 64, True, None),
    (2, 4, 2, 33, 33, 128, False, None),
    (1, 4, 2, 5, 90, 64, True, (20, 0)),
    (1, 2, 2, 77, 40, 64, True, None),
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MMA_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-Sq{}-Sk{}-D{}-c{}-w{}".format(*c))
def test_tensor_core_forward_matches_float64(simt, case, dtype):
    b, hq, hkv, sq, sk, d, causal, window = case
    left, right = fa._window(window, causal)
    gen = torch.Generator().manual_seed(sum(case[:6]))
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    out, lse = simt_forward_mma(simt, q, k, v, d ** -0.5, left, right)
    ref_out, ref_lse = fa.attention_math(q.double(), k.double(), v.double(), d ** -0.5, left, right)
    assert_close_rel(out, ref_out, REL_TOL[dtype], f"out {case}")
    assert torch.equal(lse.isinf(), ref_lse.isinf()), "rows that see no key must have LSE -inf"
    assert_close_rel(lse.nan_to_num(neginf=0), ref_lse.nan_to_num(neginf=0), 1e-5, f"lse {case}")


def simt_backward_mma(lib, q, k, v, out, dout, lse, dlse, scale, left, right):
    dq, dk, dv = (poison_(torch.empty_like(t, memory_format=torch.contiguous_format)) for t in (q, k, v))
    delta = poison_(torch.empty(q.shape[:3]))
    status = lib.gf_simt_attention_backward_mma(
        DTYPE_CODES[q.dtype], *(ptr(t) for t in (q, k, v, out, dout, lse, dlse, dq, dk, dv, delta)),
        ctypes.c_longlong(q.shape[0]), _params(q, k, v, left, right), ctypes.c_float(scale))
    assert status == 0
    return dq, dk, dv


# The tensor-core backward's cases: the forward's, plus MQA (the dK/dV sum over 4 query heads) and rows and keys
# past several 32-row tiles and 64-row blocks
BWD_MMA_CASES = MMA_CASES + [(1, 4, 1, 100, 70, 128, True, None), (2, 2, 1, 65, 129, 64, False, (30, 10))]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", BWD_MMA_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-Sq{}-Sk{}-D{}-c{}-w{}".format(*c))
def test_tensor_core_backward_matches_float64(simt, case, dtype):
    """dQ, dK, dV of csrc/flash_attention_bwd_mma.cu within twice the error of PyTorch's backward computed in the
    same dtype (flash-attention's rule and its upcast=False reference: the kernel rounds P and dS to 16 bits
    before their products, as every FlashAttention does), from the forward's own output and LSE; q strided over
    heads and rows."""
    b, hq, hkv, sq, sk, d, causal, window = case
    left, right = fa._window(window, causal)
    scale = d ** -0.5
    gen = torch.Generator().manual_seed(sum(case[:6]) + 1)
    make = lambda *shape: torch.randn(*shape, generator=gen).to(dtype)  # noqa: E731
    q = make(b, sq, hq, d).transpose(1, 2)
    k, v, dout = make(b, hkv, sk, d), make(b, hkv, sk, d), make(b, hq, sq, d)
    dlse = torch.randn(b, hq, sq, generator=gen)
    out, lse = simt_forward_mma(simt, q, k, v, scale, left, right)
    grads = simt_backward_mma(simt, q, k, v, out, dout, lse, dlse, scale, left, right)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref_out, ref_lse = fa.attention_math(q64, k64, v64, scale, left, right)
    expected = fa.attention_math_backward(dout.double(), dlse.double(), q64, k64, v64, ref_out, ref_lse, scale,
                                          left, right)
    theirs = fa.attention_math_backward(dout, dlse, q, k, v, out, lse, scale, left, right, upcast=False)
    for name, got, ref, torch_grad in zip(("dq", "dk", "dv"), grads, expected, theirs, strict=True):
        assert not got.isnan().any(), name
        err, torch_err = max_rel_error(got, ref), max_rel_error(torch_grad, ref)
        assert err <= 2 * torch_err + 1e-6, f"{name} {case}: {err:.3e}, PyTorch's {dtype} backward {torch_err:.3e}"


BWD_MUTATIONS = {  # a wrong dK/dV kernel, a wrong dQ kernel
    "dV from dSᵀ": ("accumulate_times_rows<T, kHeadDim>(dv_acc, p, dos, lane);",
                    "accumulate_times_rows<T, kHeadDim>(dv_acc, ds, dos, lane);"),
    "dQ with the other row's delta": ("ds[j][e] = pe * (dp[j][e] - row_delta[e / 2]);",
                                      "ds[j][e] = pe * (dp[j][e] - row_delta[1 - e / 2]);"),
}


@pytest.mark.parametrize("name", list(BWD_MUTATIONS))
def test_a_mutated_tensor_core_backward_fails(tmp_path, name):
    from tests.csrc import simt_build

    original, mutated = BWD_MUTATIONS[name]
    lib = simt_build.build("attention", tmp_path, simt_build.replacing("flash_attention_bwd_mma.cu", original, mutated))
    gen = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(1, 2, 40, 64, generator=gen).to(torch.float16) for _ in range(4))
    dlse = torch.zeros(1, 2, 40)
    out, lse = simt_forward_mma(lib, q, k, v, 0.125, -1, 0)
    grads = simt_backward_mma(lib, q, k, v, out, dout, lse, dlse, 0.125, -1, 0)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref_out, ref_lse = fa.attention_math(q64, k64, v64, 0.125, -1, 0)
    expected = fa.attention_math_backward(dout.double(), dlse.double(), q64, k64, v64, ref_out, ref_lse, 0.125, -1, 0)
    worst = max(max_rel_error(g, e) for g, e in zip(grads, expected, strict=True))
    assert worst > 0.05, f"the mutated backward still matches (worst error {worst:.2e})"


def test_a_k_fragment_row_moved_by_one_fails(tmp_path):
    """The mutation check: the K operand's ldmatrix rows off by one give wrong scores, and a wrong output."""
    from tests.csrc import simt_build

    original = "return {(lane % 8) + 8 * (lane / 16), (lane / 8) % 2};"
    mutated = "return {((lane + 1) % 8) + 8 * (lane / 16), (lane / 8) % 2};"

    lib = simt_build.build("attention", tmp_path, simt_build.replacing("mma.cuh", original, mutated))
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 1, 64, 64, generator=gen).to(torch.float16) for _ in range(3))
    out, _ = simt_forward_mma(lib, q, k, v, 0.125, -1, -1)
    ref, _ = fa.attention_math(q.double(), k.double(), v.double(), 0.125, -1, -1)
    err = max_rel_error(out, ref)
    assert err > 0.05, f"the mutated kernel still matches (error {err:.2e})"
