"""gf.vector_add on every backend that runs here, against float64, plus the op's torch.library contract."""

import pytest
import torch

import gpuforge as gf
from gpuforge.kernels import backends
from gpuforge.kernels.vector_add import BACKENDS
from tests.helpers import assert_close_rel

DTYPE_TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
SIZES = (0, 1, 2, 97, 1000, 4099)


def runnable_backends(device):
    return BACKENDS.runnable(device)


def backend_params():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return runnable_backends(device)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", list(DTYPE_TOL))
@pytest.mark.parametrize("n", SIZES)
def test_matches_float64(backend, dtype, n, device):
    if not BACKENDS.supports(backend, dtype):
        with pytest.raises(TypeError, match="bfloat16"):
            gf.vector_add(torch.ones(3, dtype=dtype, device=device), torch.ones(3, dtype=dtype, device=device),
                          backend=backend)
        return
    a = torch.randn(n, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype)
    out = gf.vector_add(a, b, backend=backend)
    assert out.dtype == dtype and out.shape == a.shape and out.device == a.device
    assert_close_rel(out, a.double() + b.double(), DTYPE_TOL[dtype])


@pytest.mark.parametrize("backend", backend_params())
def test_strided_and_batched_inputs(backend, device):
    base_a = torch.randn(7, 26, device=device)
    base_b = torch.randn(26, 7, device=device)
    a, b = base_a[:, ::2], base_b.t()[:, ::2]  # non-contiguous views of the same shape
    assert not a.is_contiguous() and not b.is_contiguous()
    out = gf.vector_add(a, b, backend=backend)
    assert_close_rel(out, a.double() + b.double(), 1e-6)


def test_auto_uses_torch_on_cpu_tensors():
    assert BACKENDS.select("auto", torch.device("cpu")) == "torch"


def test_env_preference_is_used_when_it_can_run(monkeypatch):
    monkeypatch.setenv("GPUFORGE_BACKEND", "triton")
    expected = "triton" if backends.is_available("triton")[0] and backends.runs_on("triton", torch.device("cpu")) \
        else "torch"
    assert BACKENDS.select("auto", torch.device("cpu")) == expected


def test_env_preference_rejects_unknown_name(monkeypatch):
    monkeypatch.setenv("GPUFORGE_BACKEND", "opencl")
    with pytest.raises(ValueError, match="GPUFORGE_BACKEND"):
        gf.vector_add(torch.ones(2), torch.ones(2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error paths")
@pytest.mark.parametrize("backend", ["cuda", "cupy"])
def test_gpu_backends_explain_why_they_cannot_run(backend):
    with pytest.raises(RuntimeError, match=f"backend='{backend}' is unavailable"):
        gf.vector_add(torch.ones(2), torch.ones(2), backend=backend)


@pytest.mark.parametrize(
    "a, b, error, match",
    [
        ([1.0, 2.0], torch.ones(2), TypeError, "a: expected a torch.Tensor"),
        (torch.ones(2), None, TypeError, "b: expected a torch.Tensor"),
        (torch.ones(2, dtype=torch.int64), torch.ones(2, dtype=torch.int64), TypeError, "a: expected dtype"),
        (torch.ones(2), torch.ones(2, dtype=torch.float16), TypeError, "b: expected dtype torch.float32"),
        (torch.ones(2), torch.ones(3), ValueError, r"b: expected shape \(2,\)"),
        (torch.ones(2), torch.ones(2, device="meta"), ValueError, "b: expected device cpu"),
    ],
)
def test_bad_input_names_the_argument(a, b, error, match):
    with pytest.raises(error, match=match):
        gf.vector_add(a, b)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        gf.vector_add(torch.ones(2), torch.ones(2), backend="opencl")


@pytest.mark.parametrize("backend", backend_params())
def test_autograd(backend, device):
    a = torch.randn(33, device=device, requires_grad=True)
    b = torch.randn(33, device=device, requires_grad=True)
    grad = torch.randn(33, device=device)
    gf.vector_add(a, b, backend=backend).backward(grad)
    assert torch.equal(a.grad, grad) and torch.equal(b.grad, grad)


def test_opcheck_and_gradcheck():
    a = torch.randn(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.gpuforge.vector_add.default, (a, b, "torch"))
    assert torch.autograd.gradcheck(lambda x, y: torch.ops.gpuforge.vector_add(x, y, "torch"), (a, b))


@pytest.mark.parametrize("backend", backend_params())
def test_torch_compile_fullgraph(backend, device):
    a, b = torch.randn(65, device=device), torch.randn(65, device=device)
    compiled = torch.compile(lambda x, y: gf.vector_add(x, y, backend=backend) * 2, fullgraph=True)
    assert_close_rel(compiled(a, b), 2 * (a.double() + b.double()), 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "cupy", "triton"])
def test_more_than_2_pow_31_elements(backend):
    n = (1 << 31) + 17  # 64-bit indexing: 4.3 GB per fp16 tensor
    a = torch.ones(n, device="cuda", dtype=torch.float16)
    b = torch.full((n,), 2.0, device="cuda", dtype=torch.float16)
    out = gf.vector_add(a, b, backend=backend)
    assert bool((out[-1000:] == 3).all()) and bool((out[:1000] == 3).all())
    assert int((out != 3).sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "cupy"])
def test_unaligned_pointers_take_the_scalar_path(backend):
    a = torch.randn(1001, device="cuda")[1:]  # 4-byte offset: not 16-byte aligned
    b = torch.randn(1001, device="cuda")[1:]
    assert_close_rel(gf.vector_add(a, b, backend=backend), a.double() + b.double(), 1e-6)
