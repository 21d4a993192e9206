"""The persistent tensor-descriptor (TMA) matmul of kernels/triton/matmul_tma.py: numbers in the Triton
interpreter against float64 (16-bit: within 2x the error of a same-precision torch matmul; fp8 e4m3 with
per-tensor and per-row scales: within one output ulp), and what it compiles to (sm_90: HGMMA, and QGMMA on fp8,
fed by UTMALDG; sm_100: warp-specialised UTCHMMA; no spills), ahead of time with no GPU."""

from __future__ import annotations

import os

import pytest
import torch

from gpuforge.kernels.triton import matmul_tma

DTYPES = (torch.float16, torch.bfloat16)
# (M, N, K): odd M, rows 16-byte aligned (N, K multiples of 8), more tiles than programs, a single row
SHAPES = ((37, 48, 40), (1, 8, 8), (100, 72, 136), (129, 40, 24))


def _torch_error(a, b, want):
    return (torch.matmul(a.float(), b.float()).to(a.dtype).double() - want).abs().max().item()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter run; a GPU run covers sm_90")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_matches_float64_within_twice_torch(m, n, k, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + n + k)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    want = a.double() @ b.double()
    out = matmul_tma.forward(a, b)  # output poisoned with NaN before the kernel (tests/conftest.py)
    assert out.dtype == dtype and out.shape == (m, n) and not out.isnan().any()
    error = (out.double() - want).abs()
    if dtype == torch.bfloat16:
        # the interpreter casts fp32 to bf16 by truncation, not rounding to nearest: up to one bf16 ulp of the
        # result (twice a rounded cast's half ulp), so the 2x-torch rule is checked per element against one ulp
        ulp = torch.finfo(torch.bfloat16).eps * torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=1e-30))))
        assert (error <= ulp + 1e-5 * k).all(), (error - ulp).max()
    else:
        assert error.max().item() <= 2 * _torch_error(a, b, want) + 1e-6, (error.max(), _torch_error(a, b, want))


def _ulp(want, dtype):
    return torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=1e-30))))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter run; a GPU run covers sm_90")
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("m, n, k, per_row", [(37, 40, 48, True), (65, 8, 16, False), (100, 72, 160, True),
                                              (1, 16, 32, False)])
def test_fp8_matches_float64(m, n, k, per_row, out_dtype):
    """fp8 e4m3 operands (B given as Bᵀ), per-tensor or per-row/column scales: the fp32-accumulated product of
    the exact fp8 values, scaled, within one ulp of the output dtype of float64 (the interpreter casts by
    truncation: one ulp, twice a rounded cast's half ulp). The dot is upcast in the interpreter, so this proves
    the data movement, the layout and the scaling, not the tensor cores' fp8 arithmetic."""
    gen = torch.Generator().manual_seed(m + 7 * n + k)
    a = (3 * torch.randn(m, k, generator=gen)).to(matmul_tma.FP8)
    b_t = (3 * torch.randn(n, k, generator=gen)).to(matmul_tma.FP8)
    a_scale = torch.rand(m if per_row else 1, generator=gen) + 0.5
    b_scale = torch.rand(n if per_row else 1, generator=gen) + 0.5
    out = matmul_tma.forward_fp8(a, b_t, a_scale, b_scale, out_dtype)
    rows = a_scale.double()[:, None] if per_row else a_scale.double()
    cols = b_scale.double()[None, :] if per_row else b_scale.double()
    want = (a.double() @ b_t.double().T) * rows * cols
    assert out.dtype == out_dtype and out.shape == (m, n) and not out.isnan().any()
    assert ((out.double() - want).abs() <= _ulp(want, out_dtype) + 1e-4).all()


def test_fp8_bad_input_names_the_argument():
    a, b_t = torch.zeros(4, 32, dtype=matmul_tma.FP8), torch.zeros(8, 32, dtype=matmul_tma.FP8)
    one = torch.ones(1)
    with pytest.raises(ValueError, match="a, b_t: expected 2-D float8_e4m3fn"):
        matmul_tma.forward_fp8(a.half(), b_t, one, one)
    with pytest.raises(ValueError, match=r"b_t: expected \(N, K=32\)"):
        matmul_tma.forward_fp8(a, b_t[:, :16], one, one)
    with pytest.raises(ValueError, match="a_scale: expected a float32 tensor of 1 or 4 elements"):
        matmul_tma.forward_fp8(a, b_t, torch.ones(3), one)
    with pytest.raises(ValueError, match="b_scale: expected a float32 tensor"):
        matmul_tma.forward_fp8(a, b_t, one, torch.ones(8, dtype=torch.float16))
    with pytest.raises(ValueError, match="multiples of 16 and 8"):
        matmul_tma.forward_fp8(torch.zeros(4, 24, dtype=matmul_tma.FP8), torch.zeros(8, 24, dtype=matmul_tma.FP8),
                               one, one)
    with pytest.raises(ValueError, match="out_dtype"):
        matmul_tma.forward_fp8(a, b_t, one, one, torch.float32)


def test_empty_operands_give_zeros():
    a, b = torch.randn(5, 0, dtype=torch.float16), torch.randn(0, 16, dtype=torch.float16)
    assert torch.equal(matmul_tma.forward(a, b), torch.zeros(5, 16, dtype=torch.float16))


def test_operands_tma_cannot_take_are_refused():
    a = torch.randn(8, 29, dtype=torch.float16)  # 58-byte rows
    assert not matmul_tma.accepts(a, torch.randn(29, 8, dtype=torch.float16))
    assert not matmul_tma.accepts(torch.randn(8, 8), torch.randn(8, 8))  # fp32
    assert not matmul_tma.accepts(torch.randn(8, 16, dtype=torch.float16).t(), torch.randn(8, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        matmul_tma.forward(a, torch.randn(29, 8, dtype=torch.float16))


@pytest.mark.slow
@pytest.mark.parametrize("cc, label, mma", [(90, "bfloat16 128x128x64 w4 s4 tma persistent", "HGMMA"),
                                            (100, "bfloat16 128x128x64 w4 s4 tma persistent warp-specialized",
                                             "UTCHMMA"),
                                            (90, "float8_e4m3fn 128x128x128 w8 s4 tma persistent", "QGMMA")],
                         ids=["sm_90", "sm_100 warp-specialized", "sm_90 fp8"])
def test_tensor_cores_fed_by_tma_without_spills(cc, label, mma):
    """One autotune configuration compiled as the JIT would, for sm_90 (wgmma: HGMMA; on fp8, QGMMA) and,
    warp-specialised, for sm_100 (tcgen05: UTCHMMA): bulk tensor copies (UTMALDG), the C tile stored by TMA
    (UTMASTG), nothing in local memory."""
    pytest.importorskip("triton.backends.nvidia")
    import subprocess
    import sys

    script = ("from gpuforge.kernels.triton import matmul_tma\n"
              "from gpuforge.profiling.static.triton_aot import inspect_variant\n"
              "import json\n"
              f"v = [v for v in matmul_tma.compile_variants() if v.label == '{label}'][0]\n"
              f"assert v.archs == ({cc},)\n"
              f"print(json.dumps(inspect_variant(v, {cc}, use_cache=False)))\n")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    from gpuforge.profiling.static.checks import problems

    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["mix"][mma] > 0 and record["mix"]["UTMALDG"] > 0 and record["mix"]["UTMASTG"] > 0
    assert record["stack"] + record["local"] == 0 and record["mix"]["STL"] == record["mix"]["LDL"] == 0
    assert problems(record) == []
