"""gf.matmul on every backend that runs here, against float64, plus the op's torch.library contract.

On a CPU the Triton interpreter and the numba simulator run the kernels; numba shapes stay tiny (the simulator
runs a Python thread per CUDA thread). GPU-marked tests cover the CUDA C++ (both paths), cupy and Triton at
sizes where tiles, pipelines and tensor cores are exercised."""

import pytest
import torch
from hypothesis import given, seed, settings
from hypothesis import strategies as st

import gpuforge as gf
from gpuforge.kernels.matmul import BACKENDS
from tests.helpers import REL_TOL_GPU_FP32_DOT, assert_close_rel, max_rel_error

# Errors grow ~sqrt(K) · unit roundoff; these hold for K ≤ ~200 (fp16/bf16 round the output once).
DTYPE_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# (M, K, N): 1, primes, 97, 130, non-multiples of every block size.
SHAPES = ((1, 1, 1), (1, 7, 13), (97, 31, 130), (130, 97, 5), (64, 128, 64))
NUMBA_SHAPES = ((1, 3, 1), (9, 17, 11), (33, 5, 2))


def runnable_backends(device):
    return BACKENDS.runnable(device)


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BACKEND_PARAMS = runnable_backends(DEVICE)


def tol(backend, dtype, device):
    if dtype == torch.float32 and backend == "triton" and device.type == "cuda":
        return REL_TOL_GPU_FP32_DOT  # tf32 tensor cores
    return DTYPE_TOL[dtype]


def shapes_for(backend):
    return NUMBA_SHAPES if backend == "numba" else SHAPES


def ref(a, b):
    return torch.matmul(a.double(), b.double())


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
def test_matches_float64(backend, dtype, device):
    if not BACKENDS.supports(backend, dtype):
        with pytest.raises(TypeError, match="bfloat16"):
            ones = torch.ones(2, 2, dtype=dtype, device=device)
            gf.matmul(ones, ones, backend=backend)
        return
    for m, k, n in shapes_for(backend):
        a = torch.randn(m, k, device=device).to(dtype)
        b = torch.randn(k, n, device=device).to(dtype)
        out = gf.matmul(a, b, backend=backend)
        assert out.dtype == dtype and out.shape == (m, n) and out.device == a.device
        assert_close_rel(out, ref(a, b), tol(backend, dtype, device), f"{backend} {dtype} {(m, k, n)}")


@pytest.mark.skipif("triton" not in BACKEND_PARAMS, reason="triton cannot run here")
@seed(20261123)
@settings(max_examples=12, deadline=None)
@given(m=st.integers(1, 70), k=st.integers(1, 70), n=st.integers(1, 70), batch=st.integers(1, 3),
       transpose_a=st.booleans(), transpose_b=st.booleans())
def test_triton_shape_fuzz(m, k, n, batch, transpose_a, transpose_b):
    a = torch.randn(batch, k, m, device=DEVICE).mT if transpose_a else torch.randn(batch, m, k, device=DEVICE)
    b = torch.randn(n, k, device=DEVICE).t() if transpose_b else torch.randn(k, n, device=DEVICE)
    assert_close_rel(gf.matmul(a, b, backend="triton"), ref(a, b), tol("triton", torch.float32, DEVICE))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_transposed_and_sliced_inputs(backend, device):
    m, k, n = (9, 13, 6) if backend == "numba" else (45, 70, 37)
    a = torch.randn(k, m, device=device).t()  # column-major
    b = torch.randn(n, 2 * k, device=device).t()[::2]  # transposed and strided along K
    assert not a.is_contiguous() and not b.is_contiguous()
    assert_close_rel(gf.matmul(a, b, backend=backend), ref(a, b), tol(backend, torch.float32, device))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_batched_and_broadcast(backend, device):
    dtype = torch.float16
    m, k, n = (5, 7, 3) if backend == "numba" else (19, 40, 23)
    cases = [
        (torch.randn(2, 3, m, k), torch.randn(k, n)),  # matrix b: the batch folds into M
        (torch.randn(3, m, k), torch.randn(3, k, n)),  # same batch
        (torch.randn(2, 1, m, k), torch.randn(3, k, n)),  # broadcast on both sides
        (torch.randn(m, k), torch.randn(2, k, n).mT.contiguous().mT),  # matrix a, batched column-major b
    ]
    for a, b in cases:
        a, b = a.to(device, dtype), b.to(device, dtype)
        out = gf.matmul(a, b, backend=backend)
        expected = ref(a, b)
        assert out.shape == expected.shape
        assert_close_rel(out, expected, DTYPE_TOL[dtype], f"{tuple(a.shape)} @ {tuple(b.shape)}")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("b_batched", [False, True], ids=["b-matrix", "b-batched"])
def test_backward(backend, b_batched, device):
    m, k, n = (5, 6, 3) if backend == "numba" else (33, 20, 17)
    a = torch.randn(2, m, k, device=device, requires_grad=True)
    b = torch.randn(*((2,) if b_batched else ()), k, n, device=device, requires_grad=True)
    grad = torch.randn(2, m, n, device=device)
    gf.matmul(a, b, backend=backend).backward(grad)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    torch.matmul(a64, b64).backward(grad.double())
    assert a.grad.shape == a.shape and b.grad.shape == b.shape
    assert_close_rel(a.grad, a64.grad, tol(backend, torch.float32, device), "dA")
    assert_close_rel(b.grad, b64.grad, tol(backend, torch.float32, device), "dB")


def test_backward_sums_over_broadcast_batch():
    a = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 1, 5, 6, dtype=torch.float64, requires_grad=True)
    torch.ops.gpuforge.matmul(a, b, "torch").sum().backward()
    a_ref, b_ref = a.detach().requires_grad_(), b.detach().requires_grad_()
    torch.matmul(a_ref, b_ref).sum().backward()
    assert torch.allclose(a.grad, a_ref.grad) and torch.allclose(b.grad, b_ref.grad)


def test_empty_dims_give_zeros():
    out = gf.matmul(torch.randn(3, 0), torch.randn(0, 4), backend="torch")
    assert torch.equal(out, torch.zeros(3, 4))
    assert gf.matmul(torch.randn(0, 5), torch.randn(5, 4)).shape == (0, 4)


def test_auto_uses_torch_on_cpu_tensors():
    assert BACKENDS.select("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize(
    "a, b, error, match",
    [
        ([[1.0]], torch.ones(1, 1), TypeError, "a: expected a torch.Tensor"),
        (torch.ones(2, 3), torch.ones(4, 5), ValueError, r"b: expected shape \(\.\.\., K=3, N\)"),
        (torch.ones(2, 3, dtype=torch.int32), torch.ones(3, 2, dtype=torch.int32), TypeError,
         "a: expected dtype"),
        (torch.ones(2, 3), torch.ones(3, 2, dtype=torch.float16), TypeError,
         "b: expected dtype torch.float32"),
        (torch.ones(3), torch.ones(3, 2), ValueError, "a: expected at least 2 dims"),
        (torch.ones(2, 3), torch.ones(3), ValueError, "b: expected at least 2 dims"),
        (torch.ones(2, 2, 3), torch.ones(3, 3, 2), ValueError, "b: batch dims"),
        (torch.ones(2, 3), torch.ones(3, 2, device="meta"), ValueError, "b: expected device cpu"),
    ],
)
def test_bad_input_names_the_argument(a, b, error, match):
    with pytest.raises(error, match=match):
        gf.matmul(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error paths")
@pytest.mark.parametrize("backend", ["cuda", "cupy"])
def test_gpu_backends_explain_why_they_cannot_run(backend):
    with pytest.raises(RuntimeError, match=f"backend='{backend}' is unavailable"):
        gf.matmul(torch.ones(2, 2), torch.ones(2, 2), backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, device):
    if backend not in BACKEND_PARAMS:
        pytest.skip(f"{backend} cannot run here")
    a = torch.randn(2, 9, 12, device=device, requires_grad=True)
    b = torch.randn(12, 7, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.gpuforge.matmul.default, (a, b, backend))


def test_gradcheck_float64():
    a = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: torch.ops.gpuforge.matmul(x, y, "torch"), (a, b))
    b3 = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, y: torch.ops.gpuforge.matmul(x, y, "torch"), (a, b3))


@pytest.mark.parametrize("backend", [b for b in BACKEND_PARAMS if b != "numba"])
def test_torch_compile_fullgraph(backend, device):
    a, b = torch.randn(2, 21, 30, device=device), torch.randn(30, 11, device=device)
    compiled = torch.compile(lambda x, y: torch.relu(gf.matmul(x, y, backend=backend)) * 2, fullgraph=True)
    assert_close_rel(compiled(a, b), 2 * torch.relu(ref(a, b)), tol(backend, torch.float32, device))


@pytest.mark.parametrize("backend", [b for b in BACKEND_PARAMS if b != "numba"])
def test_torch_compile_fullgraph_backward(backend, device):
    a = torch.randn(3, 10, 24, device=device, requires_grad=True)
    b = torch.randn(24, 7, device=device, requires_grad=True)
    compiled = torch.compile(lambda x, y: (gf.matmul(x, y, backend=backend) ** 2).sum(), fullgraph=True)
    compiled(a, b).backward()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    (torch.matmul(a64, b64) ** 2).sum().backward()
    assert_close_rel(a.grad, a64.grad, tol(backend, torch.float32, device), "dA")
    assert_close_rel(b.grad, b64.grad, tol(backend, torch.float32, device), "dB")


@pytest.mark.parametrize("backend", [b for b in BACKEND_PARAMS if b != "numba"])  # numba: in the CLI check
def test_selfcheck_cases_pass(backend, device):
    from gpuforge.kernels._selfcheck import run_case
    from gpuforge.kernels.matmul import selfcheck_cases

    for case in selfcheck_cases(device):
        result = run_case(case, backend, case.reference())
        assert result.passed, result


def test_exported_from_package():
    assert "matmul" in gf.__all__ and gf.matmul is not None


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "cupy", "triton"])
@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
@pytest.mark.parametrize("mkn", [(1, 8, 8), (97, 130, 61), (1000, 1032, 520), (512, 4096, 256),
                                 (257, 255, 253)])
def test_gpu_numerics(backend, dtype, mkn):
    m, k, n = mkn
    a = torch.randn(m, k, device="cuda", dtype=dtype)
    b = torch.randn(k, n, device="cuda", dtype=dtype)
    # fp16/bf16: the kernel's error at most 2x that of cuBLAS (same precision) against float64, plus slack.
    limit = max(2 * ((torch.matmul(a, b).double() - ref(a, b)).abs().max() / ref(a, b).abs().max()).item(),
                tol(backend, dtype, a.device) * (k / 128) ** 0.5)
    assert_close_rel(gf.matmul(a, b, backend=backend), ref(a, b), limit, f"{backend} {dtype} {mkn}")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "cupy", "triton"])
def test_gpu_batched_strided_and_unaligned(backend):
    a = torch.randn(3, 200, 136, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(3, 136, 72, device="cuda", dtype=torch.bfloat16).mT.contiguous().mT
    assert_close_rel(gf.matmul(a, b, backend=backend), ref(a, b), 2e-2)
    # 2-byte offset, K a multiple of 4 but not of 8: the tensor-core path's alignment test must refuse it
    a_odd = torch.randn(70, 101, device="cuda", dtype=torch.float16)[:, 1:]
    b_odd = torch.randn(100, 33, device="cuda", dtype=torch.float16)
    assert_close_rel(gf.matmul(a_odd, b_odd, backend=backend), ref(a_odd, b_odd), 4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "cupy", "triton", "numba"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_gpu_backward(backend, dtype):
    if not BACKENDS.supports(backend, dtype):
        pytest.skip(f"{backend} has no {dtype}")
    a = torch.randn(4, 96, 136, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(136, 200, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(4, 96, 200, device="cuda", dtype=dtype)
    gf.matmul(a, b, backend=backend).backward(grad)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    torch.matmul(a64, b64).backward(grad.double())
    limit = 2 * tol(backend, dtype, a.device)  # dB sums over 384 rows
    assert_close_rel(a.grad, a64.grad, limit, "dA")
    assert_close_rel(b.grad, b64.grad, limit, "dB")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_backward_with_k_zero(backend, device):
    """(5, 0) @ (0, 10): the product is zeros and so are both gradients (the backward's reshape used to fail)."""
    a = torch.randn(5, 0, device=device, requires_grad=True)
    b = torch.randn(0, 10, device=device, requires_grad=True)
    y = gf.matmul(a, b, backend=backend)
    y.backward(torch.randn_like(y))
    assert y.shape == (5, 10) and not y.any()
    assert a.grad.shape == (5, 0) and b.grad.shape == (0, 10)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_fp16_backward_of_a_broadcast_operand_is_summed_in_fp32(backend, device):
    """A (1, 10) operand broadcast over a (5, 5) batch: its gradient sums 25 products; within 2x torch's own fp16
    error (the per-batch products rounded to fp16 before the sum gave 4.7x)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 10, generator=g).to(device=device, dtype=torch.float16)
    b = torch.randn(5, 5, 10, 5, generator=g).to(device=device, dtype=torch.float16)
    grad = torch.randn(5, 5, 1, 5, generator=g).to(device=device, dtype=torch.float16)

    def grads(fn, x, y, dy):
        x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
        fn(x, y).backward(dy)
        return x.grad, y.grad

    ours = grads(lambda x, y: gf.matmul(x, y, backend=backend), a, b, grad)
    theirs = grads(torch.matmul, a, b, grad)
    exact = grads(torch.matmul, a.double(), b.double(), grad.double())
    for name, o, t, e in zip(("da", "db"), ours, theirs, exact, strict=True):
        assert o.dtype == torch.float16
        assert max_rel_error(o, e) <= 2 * max_rel_error(t, e) + 1e-4, name


def test_the_wgmma_kernel_is_opt_in_and_hopper_only(monkeypatch):
    """The cuda backend takes csrc/matmul_wgmma.cu only with GPUFORGE_CUDA_WGMMA=1 on compute capability 9.0;
    a malformed value is a clear error (its numbers are checked in tests/csrc/test_matmul_wgmma_simt.py)."""
    from gpuforge.kernels.cuda.hopper import wgmma_enabled

    monkeypatch.setenv("GPUFORGE_CUDA_WGMMA", "1")
    assert not wgmma_enabled(torch.device("cpu"))
    monkeypatch.setenv("GPUFORGE_CUDA_WGMMA", "yes")
    with pytest.raises(ValueError, match="GPUFORGE_CUDA_WGMMA: expected 0 or 1"):
        wgmma_enabled(torch.device("cpu"))
