"""gf.int4_matmul against dequantize-then-matmul in float64: every group size, odd M and N, fp16/bf16
(fp32 on torch/triton), backward for x, the torch.library op (opcheck, gradcheck, compile), bad input."""

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

import gpuforge as gf
from gpuforge.kernels.int4_matmul import X_DTYPES, _int4_matmul_op
from gpuforge.quant import Int4Weight, dequantize_int4, quantize_int4
from tests.helpers import REL_TOL, assert_close_rel

# (M, N, K, group_size): odd M and N, K a multiple of every group size used, per-channel groups (-1).
SHAPES = [(1, 67, 128, 32), (3, 33, 192, 64), (17, 130, 256, 128), (5, 40, 96, -1), (2, 9, 100, -1)]
INTERPRETED = ("torch", "triton")


def _case(m, n, k, group, dtype, device, symmetric=True, seed=0):
    generator = torch.Generator().manual_seed(seed + m * 7 + n)
    q = quantize_int4(torch.randn(n, k, generator=generator), group, symmetric=symmetric).to(device)
    x = torch.randn(m, k, generator=generator).to(device=device, dtype=dtype)
    return x, q


def _reference(x, q):
    return x.double() @ dequantize_int4(q, torch.float64).T


@pytest.mark.parametrize("backend", INTERPRETED)
@pytest.mark.parametrize("dtype", X_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_float64(backend, dtype, shape, device):
    m, n, k, group = shape
    x, q = _case(m, n, k, group, dtype, device, symmetric=m % 2 == 0)
    out = gf.int4_matmul(x, q, backend=backend)
    assert out.dtype == dtype and out.shape == (m, n)
    assert_close_rel(out, _reference(x, q), REL_TOL[dtype])


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("shape", [(1, 67, 128, 32), (17, 130, 256, 128), (33, 40, 96, -1), (130, 72, 192, 64)],
                         ids=str)
def test_triton_descriptor_path_matches_float64(monkeypatch, dtype, shape):
    """The sm_90 form (x and the packed bytes by tensor descriptors, zero-filled past M, N and K; USE_TMA) run in
    the interpreter, as tma_enabled would pick it on a GPU: odd M and N, a K of 96 whose last step runs past it,
    split-K decode."""
    from gpuforge.kernels.triton import int4_matmul as triton_int4

    monkeypatch.setattr(triton_int4, "tma_enabled", lambda device: True)
    m, n, k, group = shape
    x, q = _case(m, n, k, group, dtype, "cpu", symmetric=m % 2 == 1)
    assert triton_int4.descriptors_fit(x, q.qweight)
    out = gf.int4_matmul(x, q, backend="triton")
    assert_close_rel(out, _reference(x, q), REL_TOL[dtype])
    assert not triton_int4.descriptors_fit(x[:, 1:].contiguous(), q.qweight[:, :1])  # K not a multiple of 32


@seed(20261123)
@settings(max_examples=10, deadline=None)
@given(lead=st.lists(st.integers(1, 5), max_size=2), n=st.integers(1, 70), groups=st.integers(1, 3),
       group_size=st.sampled_from((32, 64, 128, 6, 46)), symmetric=st.booleans())
def test_triton_shape_fuzz(lead, n, groups, group_size, symmetric):
    """Any batch shape (0-2 leading dims), N from 1, K = groups × group size, odd per-channel-like sizes."""
    k = groups * group_size
    generator = torch.Generator().manual_seed(n * 131 + k)
    q = quantize_int4(torch.randn(n, k, generator=generator), group_size, symmetric=symmetric)
    x = torch.randn(*lead, k, generator=generator)
    out = gf.int4_matmul(x, q, backend="triton")
    assert out.shape == (*lead, n)
    assert_close_rel(out, _reference(x, q), REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", INTERPRETED)
def test_batched_non_contiguous_input_and_awq_scales(backend, device):
    generator = torch.Generator().manual_seed(11)
    w = torch.randn(31, 128, generator=generator)
    calibration = torch.randn(64, 128, generator=generator)
    q = quantize_int4(w, 64, "awq", calibration=calibration, scale_dtype=torch.bfloat16).to(device)
    x = torch.randn(2, 128, 3, generator=generator).to(device=device, dtype=torch.float16).transpose(1, 2)
    assert not x.is_contiguous()
    out = gf.int4_matmul(x, q, backend=backend)
    assert out.shape == (2, 3, 31)
    ref = x.double() @ dequantize_int4(q, torch.float64).T
    assert_close_rel(out, ref, 4e-3)


@pytest.mark.parametrize("backend", INTERPRETED)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_backward_for_x(backend, dtype, device):
    x, q = _case(6, 45, 128, 32, dtype, device, symmetric=False)
    x.requires_grad_()
    grad = torch.randn(6, 45).to(device=device, dtype=dtype)
    gf.int4_matmul(x, q, backend=backend).backward(grad)
    assert_close_rel(x.grad, grad.double() @ dequantize_int4(q, torch.float64), REL_TOL[dtype])


def test_opcheck_and_float64_gradcheck(device):
    x, q = _case(3, 10, 64, 32, torch.float32, device)
    args = (x, q.qweight, q.scales, q.zeros, q.group_size)
    torch.library.opcheck(_int4_matmul_op, (*args, "triton"))
    x64 = x.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: _int4_matmul_op(t, *args[1:], "torch"), (x64,))


def test_torch_compile_fullgraph(device):
    x, q = _case(4, 20, 64, 32, torch.float16, device)
    compiled = torch.compile(lambda t: gf.int4_matmul(t, q, backend="triton"), fullgraph=True)
    assert_close_rel(compiled(x), _reference(x, q), REL_TOL[torch.float16])


def test_bad_inputs_raise_naming_the_argument(device):
    x, q = _case(2, 8, 64, 32, torch.float16, device)
    with pytest.raises(ValueError, match="x: expected last dim K=64"):
        gf.int4_matmul(torch.randn(2, 48, dtype=torch.float16, device=device), q)
    with pytest.raises(TypeError, match="x: expected dtype"):
        gf.int4_matmul(x.to(torch.int32), q)
    with pytest.raises(TypeError, match="qweight"):
        gf.int4_matmul(x, torch.randn(8, 64))
    with pytest.raises(ValueError, match="group_size"):
        Int4Weight(q.qweight, q.scales, q.zeros, group_size=48, symmetric=True)
    with pytest.raises(TypeError, match="qweight"):
        Int4Weight(q.qweight.to(torch.int32), q.scales, q.zeros, 32, True)
    with pytest.raises(ValueError, match="backend"):
        gf.int4_matmul(x, q, backend="tpu")


# Decode shapes (every M of the CUDA decode kernel's instantiations, split-K on and off, N not a multiple of
# its 8 channels per block), prefill shapes on the tiled kernel, and per-channel groups.
GPU_SHAPES = [(1, 4096, 4096, 128), (2, 1000, 2048, 64), (4, 11008, 4096, 128), (7, 259, 1024, 32),
              (13, 4096, 11008, 128), (16, 8192, 8192, 128), (33, 130, 512, 64), (300, 257, 384, -1),
              (1, 96, 160, 32), (2048, 512, 4096, 128)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "cupy", "triton"))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_backends_match_float64(backend, dtype, shape):
    from gpuforge.kernels import backends

    ok, why = backends.is_available(backend)
    if not ok:
        pytest.skip(why)
    m, n, k, group = shape
    generator = torch.Generator().manual_seed(m + n)
    scale_dtype = torch.bfloat16 if m % 2 else torch.float16
    q = quantize_int4(torch.randn(n, k, generator=generator), group, symmetric=m % 2 == 1,
                      scale_dtype=scale_dtype).to("cuda")
    x = (torch.randn(m, k, generator=generator) / 8).to(device="cuda", dtype=dtype)
    assert_close_rel(gf.int4_matmul(x, q, backend=backend), _reference(x, q),
                     4e-3 if dtype == torch.float16 else 2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("cuda", "triton"))
def test_gpu_unaligned_input_and_backward(backend):
    from gpuforge.kernels import backends

    ok, why = backends.is_available(backend)
    if not ok:
        pytest.skip(why)
    q = quantize_int4(torch.randn(384, 512), 128).to("cuda")
    storage = torch.randn(3 * 512 + 1, device="cuda", dtype=torch.float16)
    x = storage[1:].view(3, 512).requires_grad_()  # 2-byte offset: the CUDA wrapper takes the tiled kernel
    out = gf.int4_matmul(x, q, backend=backend)
    assert_close_rel(out, _reference(x, q), 4e-3)
    grad = torch.randn_like(out)
    out.backward(grad)
    assert_close_rel(x.grad, grad.double() @ dequantize_int4(q, torch.float64), 4e-3)
