"""The tensor-descriptor (TMA) FlashAttention forward of kernels/triton/flash_attention_tma.py: output and LSE
in the Triton interpreter against float64 (within 2x the error of a same-precision torch computation; bf16
against one ulp, the interpreter's casts truncating), causal, sliding window and GQA; the Triton backend's
routing; and its sm_90 SASS (HGMMA fed by UTMALDG, no spills), compiled ahead of time with no GPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from gpuforge.kernels.attention_problem import Problem
from gpuforge.kernels.flash_attention import attention_math, attention_math_backward
from gpuforge.kernels.triton import flash_attention_tma
from tests.helpers import max_rel_error

INTERPRETED = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the interpreter run; a GPU run covers sm_90")
# (B, Hq, Hkv, Sq, Sk, D, window_left, window_right): odd lengths, Sq != Sk, GQA, causal (right 0), a window
CASES = ((1, 4, 2, 37, 45, 64, -1, 0), (2, 2, 2, 20, 20, 128, -1, -1), (1, 2, 1, 33, 17, 64, -1, 0),
         (1, 2, 2, 41, 41, 64, 7, 0))


def _reference(q, k, v, scale, left, right, dtype=torch.float64):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1).to(dtype), v.repeat_interleave(group, 1).to(dtype)
    s = (q.to(dtype) @ k.transpose(-1, -2)) * scale
    sq, sk = q.shape[2], k.shape[2]
    diag = torch.arange(sq)[:, None] + sk - sq
    cols = torch.arange(sk)[None]
    visible = (cols <= diag + (right if right >= 0 else sk)) & (cols >= diag - (left if left >= 0 else sk))
    s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1).nan_to_num(0.0) @ v  # a query that sees no key gives 0, as the kernels do
    return out, lse


@INTERPRETED
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_float64(case, dtype):
    b, hq, hkv, sq, sk, d, left, right = case
    gen = torch.Generator().manual_seed(sum(case))
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    scale = 1 / math.sqrt(d)
    out, lse = flash_attention_tma.forward(q, k, v, Problem.dense(q, k, scale, left, right))
    want, want_lse = _reference(q, k, v, scale, left, right)
    assert not out.isnan().any() and not lse.isnan().any()
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse), seen)
    assert (lse.double() - want_lse)[seen].abs().max() < 1e-5
    error = (out.double() - want).abs()
    if dtype == torch.bfloat16:
        ulp = torch.finfo(dtype).eps * torch.exp2(torch.floor(torch.log2(want.abs().clamp(min=1e-30))))
        assert (error <= ulp + 1e-4).all(), (error - ulp).max()
    else:
        torch_out, _ = _reference(q, k, v, scale, left, right, dtype=torch.float32)
        torch_error = (torch_out.to(dtype).double() - want).abs().max()
        assert error.max() <= 2 * torch_error + 1e-6, (error.max(), torch_error)


@INTERPRETED
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_float64(case, dtype):
    """dQ, dK, dV of the descriptor kernels from the forward's own output and LSE, against float64 autograd, within
    twice the error of PyTorch's backward in the same dtype; a dLSE term too. bf16 dots run upcast in the
    interpreter (its bf16 dot is wrong), so bf16 proves the data movement and the math, not bf16 rounding."""
    b, hq, hkv, sq, sk, d, left, right = case
    gen = torch.Generator().manual_seed(sum(case) + 3)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).to(dtype) for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    dout, dlse = torch.randn(b, hq, sq, d, generator=gen).to(dtype), torch.randn(b, hq, sq, generator=gen)
    scale = 1 / math.sqrt(d)
    p = Problem.dense(q, k, scale, left, right)
    out, lse = flash_attention_tma.forward(q, k, v, p)
    got = flash_attention_tma.backward(dout, dlse, q, k, v, out, lse, p)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref_out, ref_lse = attention_math(q64, k64, v64, scale, left, right)
    dlse = dlse.masked_fill(torch.isinf(ref_lse), 0.0)  # a row that sees no key has no LSE gradient
    want = attention_math_backward(dout.double(), dlse.double(), q64, k64, v64, ref_out, ref_lse, scale, left, right)
    theirs = attention_math_backward(dout, dlse, q, k, v, out, lse, scale, left, right, upcast=False)
    for name, g, w, t in zip(("dq", "dk", "dv"), got, want, theirs, strict=True):
        assert not g.isnan().any(), name
        assert max_rel_error(g, w) <= 2 * max_rel_error(t, w) + 1e-6, (name, max_rel_error(g, w))


def test_what_the_descriptors_cannot_take_is_refused():
    q = torch.randn(1, 2, 8, 96, dtype=torch.float16)
    p = Problem.dense(q, q, 0.1, -1, -1)
    assert not flash_attention_tma.accepts(q, q, q, p)  # D 96
    q64 = torch.randn(1, 2, 8, 64)
    assert not flash_attention_tma.accepts(q64, q64, q64, Problem.dense(q64, q64, 0.1, -1, -1))  # fp32
    with pytest.raises(ValueError, match="dense contiguous fp16/bf16"):
        flash_attention_tma.forward(q, q, q, p)


def test_the_tma_kernels_are_off_without_the_switch_or_off_hopper(monkeypatch):
    """CPU tensors (and, on a GPU, anything before sm_90 or without GPUFORGE_TRITON_TMA=1) take the pointer-load
    kernels; a malformed switch raises."""
    from gpuforge.kernels.triton._host import tma_enabled

    assert not tma_enabled(torch.device("cpu"))
    monkeypatch.setenv("GPUFORGE_TRITON_TMA", "1")
    assert not tma_enabled(torch.device("cpu"))
    monkeypatch.setenv("GPUFORGE_TRITON_TMA", "maybe")
    with pytest.raises(ValueError, match="GPUFORGE_TRITON_TMA: expected 0 or 1"):
        tma_enabled(torch.device("cpu"))


@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["tma forward", "tma dkdv", "tma dq"], ids=["forward", "dK/dV", "dQ"])
def test_sm90_runs_hgmma_fed_by_tma_without_spills(kernel):
    """One D128 bf16 configuration of each kernel compiled for sm_90 as the JIT would: wgmma (HGMMA) reading tiles
    that bulk tensor copies (UTMALDG) brought, results stored by TMA (UTMASTG), nothing in local memory."""
    pytest.importorskip("triton.backends.nvidia")
    script = ("import json\n"
              "from gpuforge.kernels.triton import flash_attention_tma\n"
              "from gpuforge.profiling.static.triton_aot import inspect_variant\n"
              "v = [v for v in flash_attention_tma.compile_variants()\n"
              f"     if v.label.startswith('bfloat16 D128 ') and v.label.endswith(' {kernel}')][0]\n"
              "print(json.dumps(inspect_variant(v, 90, use_cache=False)))\n")
    done = subprocess.run([sys.executable, "-c", script], env={**os.environ, "TRITON_INTERPRET": "0"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    from gpuforge.profiling.static.checks import problems

    record = json.loads(done.stdout.strip().splitlines()[-1])
    assert record["mix"]["HGMMA"] > 0 and record["mix"]["UTMALDG"] > 0 and record["mix"]["UTMASTG"] > 0
    assert record["mix"]["HMMA"] == 0, "a dot lowered to mma.sync instead of wgmma"
    assert record["stack"] + record["local"] == 0 and problems(record) == []


def test_every_descriptor_configuration_is_wgmma_on_sm90():
    """The backward's tiles keep every dot at 64+ MMA rows (wgmma's m64), which is what BWD_TILES promises."""
    for kernel, by_dim in flash_attention_tma.BWD_TILES.items():
        for tiles in by_dim.values():
            for block_m, block_n, _, _ in tiles:
                assert (block_n if kernel == "dkdv" else block_m) >= 64, (kernel, block_m, block_n)
