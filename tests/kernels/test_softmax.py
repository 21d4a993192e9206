"""gf.softmax on every backend that runs here against float64: odd row lengths, every dtype, any dim,
non-contiguous inputs, -inf masks (fully masked rows give NaN, as torch.softmax), the online (long-row)
Triton path, backward, and the torch.library contract (opcheck, gradcheck, torch.compile)."""

import pytest
import torch

import gpuforge as gf
from gpuforge.kernels import backends
from gpuforge.kernels.softmax import BACKENDS
from tests.helpers import assert_close_rel, max_rel_error

# Forward: y rounds once to the dtype. Backward: dx uses the rounded y, so it carries ~2 roundings.
FWD_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
BWD_TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
ROW_LENGTHS = (1, 7, 97, 130, 1000)


def backend_params():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return BACKENDS.runnable(device)


def forward_backward(x, grad, fn):
    x = x.detach().requires_grad_()
    y = fn(x)
    (dx,) = torch.autograd.grad(y, x, grad)
    return y.detach(), dx


def reference(x, grad, dim=-1):
    return forward_backward(x.double(), grad.double(), lambda t: torch.softmax(t, dim))


def truncate_to_bf16(t):
    """fp32 -> bf16 rounding toward zero, as the Triton interpreter converts (a GPU rounds to nearest)."""
    return (t.float().view(torch.int32) & -65536).view(torch.float32).bfloat16()


def same_precision_torch_grad(x, grad, dim, backend):
    """dx from torch's softmax in x's dtype, with the rounding mode of the backend's stores."""
    if not (backend == "triton" and backends.triton_interpreter_on() and x.dtype == torch.bfloat16):
        return forward_backward(x, grad, lambda t: torch.softmax(t, dim))[1]
    y = truncate_to_bf16(torch.softmax(x.float(), dim)).float()
    dy = grad.float()
    return truncate_to_bf16(y * (dy - (dy * y).sum(dim, keepdim=True)))


def assert_matches_float64(y, dx, x, grad, dim, backend):
    """y and dx against float64. dx may cancel (dy − Σ dy⊙y), so its tolerance follows flash-attention's
    rule: at most 2x the error of torch's softmax in the same dtype, or BWD_TOL."""
    y_ref, dx_ref = reference(x, grad, dim)
    assert y.dtype == x.dtype and y.shape == x.shape and y.device == x.device
    assert_close_rel(y, y_ref, FWD_TOL[x.dtype], "y")
    dx_torch = same_precision_torch_grad(x, grad, dim, backend)
    assert_close_rel(dx, dx_ref, max(BWD_TOL[x.dtype], 2 * max_rel_error(dx_torch, dx_ref)), "dx")


def check(x, grad, dim, backend):
    y, dx = forward_backward(x, grad, lambda t: gf.softmax(t, dim, backend=backend))
    assert_matches_float64(y, dx, x, grad, dim, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", list(FWD_TOL))
@pytest.mark.parametrize("n", ROW_LENGTHS)
def test_matches_float64(backend, dtype, n, device):
    if not BACKENDS.supports(backend, dtype):
        with pytest.raises(TypeError, match="bfloat16"):
            gf.softmax(torch.ones(2, 3, dtype=dtype, device=device), backend=backend)
        return
    x = (4 * torch.randn(3, n, device=device)).to(dtype)
    check(x, torch.randn(3, n, device=device).to(dtype), -1, backend)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dim", [0, -2])
def test_other_dims(backend, dim, device):
    x = torch.randn(2, 3, 4, device=device)
    check(x, torch.randn_like(x), dim, backend)


@pytest.mark.parametrize("backend", backend_params())
def test_non_contiguous_inputs(backend, device):
    base = torch.randn(6, 40, device=device)
    x = base[:, 1::2]  # strided rows, last dim stride 2
    grad = torch.randn(40, 6, device=device).t()[:, ::2]
    assert not x.is_contiguous() and not grad.is_contiguous()
    check(x, grad, -1, backend)
    rows = base[1:5, 3:30]  # row stride 40, last dim contiguous
    check(rows, torch.randn(4, 27, device=device), -1, backend)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN rows in the simulators
@pytest.mark.parametrize("backend", backend_params())
def test_masks_and_fully_masked_rows_give_nan_like_torch(backend, device):
    x = torch.randn(4, 37, device=device)
    x[0, ::3] = -float("inf")
    x[1, :36] = -float("inf")  # one live entry: probability 1
    x[2] = -float("inf")  # fully masked: NaN, as torch.softmax
    y = gf.softmax(x, backend=backend)
    expected = torch.softmax(x.double(), -1)
    assert torch.isnan(expected[2]).all() and torch.isnan(y[2]).all()
    assert_close_rel(y[[0, 1, 3]], expected[[0, 1, 3]], FWD_TOL[torch.float32])
    assert bool((y[0, ::3] == 0).all()) and y[1, 36].item() == 1.0
    live = [0, 1, 3]
    grad = torch.randn_like(x)
    _, dx = forward_backward(x[live], grad[live], lambda t: gf.softmax(t, backend=backend))
    assert_close_rel(dx, reference(x[live], grad[live])[1], BWD_TOL[torch.float32], "dx")
    assert bool((dx[0, ::3] == 0).all())


@pytest.mark.skipif("triton" not in backend_params(), reason="triton cannot run here")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [130, 1000])
def test_triton_online_path_for_rows_past_the_one_pass_limit(dtype, n, device):
    """The online (running max / sum) kernels, reached by lowering the one-pass limit below n."""
    from gpuforge.kernels.triton import softmax as triton_softmax

    limits = {"max_one_pass": 64, "online_block": 64}
    x = (4 * torch.randn(3, n, device=device)).to(dtype)
    x[0, : n - 2] = -float("inf")  # whole leading chunks masked: the running sum must stay 0, not NaN
    x[1] = -float("inf")  # fully masked row: NaN, as torch.softmax
    grad = torch.randn(3, n, device=device).to(dtype)
    y = triton_softmax.forward(x, **limits)
    assert torch.isnan(y[1]).all()
    live = [0, 2]
    dx = triton_softmax.backward(grad[live], y[live], **limits)
    assert_matches_float64(y[live], dx, x[live], grad[live], -1, "triton")


@pytest.mark.parametrize("backend", backend_params())
def test_scalar_and_empty_inputs(backend, device):
    assert gf.softmax(torch.tensor(3.0, device=device), backend=backend).item() == 1.0
    assert gf.softmax(torch.empty(0, 5, device=device), backend=backend).shape == (0, 5)
    assert gf.softmax(torch.empty(4, 0, device=device), backend=backend).shape == (4, 0)


def test_auto_uses_torch_on_cpu_tensors():
    assert BACKENDS.select("auto", torch.device("cpu")) == "torch"


@pytest.mark.parametrize(
    "x, dim, error, match",
    [
        ([1.0, 2.0], -1, TypeError, "x: expected a torch.Tensor"),
        (torch.ones(2, 3, dtype=torch.int64), -1, TypeError, "x: expected dtype float32/float16/bfloat16"),
        (torch.ones(2, 3, dtype=torch.float64), -1, TypeError, "x: expected dtype"),
        (torch.ones(2, 3), 2, ValueError, r"dim: expected a dim in \[-2, 1\] for x of shape \(2, 3\), got 2"),
        (torch.ones(2, 3), -3, ValueError, "dim: expected a dim in"),
        (torch.ones(2, 3), 1.0, TypeError, "dim: expected an int, got float"),
        (torch.ones(2, 3), None, TypeError, "dim: expected an int, got NoneType"),
    ],
)
def test_bad_input_names_the_argument(x, dim, error, match):
    with pytest.raises(error, match=match):
        gf.softmax(x, dim)


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="backend: expected 'auto' or one of"):
        gf.softmax(torch.ones(2, 3), backend="opencl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error paths")
@pytest.mark.parametrize("backend", ["cuda", "cupy"])
def test_gpu_backends_explain_why_they_cannot_run(backend):
    with pytest.raises(RuntimeError, match=f"backend='{backend}' is unavailable"):
        gf.softmax(torch.ones(2, 3), backend=backend)


@pytest.mark.parametrize("backend", [b for b in backend_params() if b in ("torch", "triton")])
def test_opcheck(backend, device):
    x = torch.randn(3, 11, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.gpuforge.softmax.default, (x, backend))
    y = torch.softmax(x.detach(), -1)
    torch.library.opcheck(torch.ops.gpuforge.softmax_backward.default, (torch.randn_like(y), y, backend))


def test_gradcheck_float64_through_the_torch_path():
    x = torch.randn(3, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.gpuforge.softmax(t, "torch"), (x,))


@pytest.mark.parametrize("backend", [b for b in backend_params() if b in ("torch", "triton")])
def test_torch_compile_fullgraph_forward_and_backward(backend, device):
    x = torch.randn(4, 6, 19, device=device)
    grad = torch.randn_like(x)
    compiled = torch.compile(lambda t: gf.softmax(t * 2, 1, backend=backend), fullgraph=True)
    y, dx = forward_backward(x, grad, compiled)
    y_ref, dx_ref = forward_backward(x.double(), grad.double(), lambda t: torch.softmax(t * 2, 1))
    assert_close_rel(y, y_ref, FWD_TOL[torch.float32], "y")
    assert_close_rel(dx, dx_ref, BWD_TOL[torch.float32], "dx")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "cupy", "numba"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n", [1, 33, 257, 1024, 2050, 4096, 16384, 32768, 70001])
def test_gpu_row_lengths_across_kernel_variants(backend, dtype, n):
    """Covers the warp-per-row, block-per-row (cached) and streaming (online) kernels, aligned and not."""
    if not BACKENDS.supports(backend, dtype):
        pytest.skip(f"{backend} has no {dtype}")
    x = (4 * torch.randn(64, n, device="cuda")).to(dtype)
    x[3, : n // 2] = -float("inf")
    check(x, torch.randn(64, n, device="cuda").to(dtype), -1, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "cupy"])
def test_gpu_large_fp16_matrix_and_unaligned_rows(backend):
    x = torch.randn(4096, 8192, device="cuda", dtype=torch.float16)
    y = gf.softmax(x, backend=backend)
    assert_close_rel(y, torch.softmax(x.double(), -1), FWD_TOL[torch.float16])
    ragged = torch.randn(300, 1001, device="cuda", dtype=torch.float16)[:, 1:]  # rows not 16-byte aligned
    expected = torch.softmax(ragged.double(), -1)
    assert_close_rel(gf.softmax(ragged, backend=backend), expected, FWD_TOL[torch.float16])


@pytest.mark.parametrize("backend", backend_params())
def test_broadcast_rows_with_zero_row_stride(backend, device):
    x = torch.randn(1, 45, device=device).expand(3, 45)  # every row is the same memory
    check(x, torch.randn(3, 45, device=device), -1, backend)


def cupy_kernel_names():
    """Every kernel instantiation the cupy backend can ask for (the C++ launcher's template switch)."""
    names = []
    for ctype, vec in (("float", 4), ("__half", 8), ("__nv_bfloat16", 8)):
        for v in (1, vec):
            for kind, block_chunks in (("fwd", (0, 1, 2, 4, 8)), ("bwd", (0, 1, 2, 4))):
                names += [f"gpuforge::softmax_{kind}_warp_kernel<{ctype}, {c}, {v}>" for c in (1, 2, 4, 8)]
                names += [f"gpuforge::softmax_{kind}_block_kernel<{ctype}, {c}, {v}>" for c in block_chunks]
    return names


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("dtype", list(FWD_TOL))
@pytest.mark.parametrize("vectorized", [False, True])
def test_cupy_plan_picks_the_launcher_kernels(kind, dtype, vectorized):
    from gpuforge.kernels.cupy.module import CPP_TYPES
    from gpuforge.kernels.cupy.softmax import plan as cupy_plan

    vec = 16 // dtype.itemsize if vectorized else 1
    cached = {"fwd": 8, "bwd": 4}[kind]  # chunks per thread the block kernel keeps in registers

    def kernel(shape, chunks):
        return f"gpuforge::softmax_{kind}_{shape}_kernel<{CPP_TYPES[dtype]}, {chunks}, {vec}>"

    expected = {
        1: (kernel("warp", 1), 128, 4),
        32 * vec + 1: (kernel("warp", 2), 128, 4),
        256 * vec: (kernel("warp", 8), 128, 4),
        256 * vec + 1: (kernel("block", 1), 512, 1),
        512 * cached * vec: (kernel("block", cached), 512, 1),
        512 * cached * vec + 1: (kernel("block", 0), 512, 1),  # streaming (online) kernel
    }
    for n, plan in expected.items():
        assert cupy_plan(kind, dtype, n, vectorized) == plan, n
        assert plan[0] in cupy_kernel_names()


def test_softmax_cu_compiles_under_nvrtc_with_every_cupy_instantiation():
    from gpuforge.profiling.static import nvrtc

    if not nvrtc.available():
        pytest.skip("needs the nvidia-cuda-nvrtc wheel and CUDA headers (the dev extra)")
    names = cupy_kernel_names()
    build = nvrtc.compile_source(nvrtc.CSRC / "softmax.cu", names, "sm_90a")
    assert build.status == 0, build.log
    assert all(build.lowered.get(name) for name in names)


def test_benchmark_cases_compute_the_reference():
    """Every timed function of the CPU quick benchmark computes the op (forward: y; forward+backward: dx)."""
    from gpuforge.profiling.bench_softmax import bench_cases

    cases = bench_cases(torch.device("cpu"), quick=True)
    assert {c.shape.split()[-1] for c in cases} == {"fwd", "fwd+bwd"}
    for case in cases:
        inputs = case.make_inputs()
        want = case.reference(*[t.double() for t in inputs])
        assert set(case.fns) >= set(backend_params())
        for label, fn in case.fns.items():
            assert max_rel_error(fn(*inputs), want) <= BWD_TOL[case.dtype], (case.shape, label)


def test_preferred_backend_without_the_dtype_falls_back(monkeypatch, device):
    """GPUFORGE_BACKEND=numba is a preference: a bfloat16 input (numba has none) takes another backend under
    backend="auto" instead of raising."""
    monkeypatch.setenv("GPUFORGE_BACKEND", "numba")
    x = torch.randn(3, 17, device=device, dtype=torch.bfloat16)
    assert BACKENDS.select("auto", x.device, dtype=x.dtype) != "numba"
    assert torch.allclose(gf.softmax(x).float(), torch.softmax(x.float(), -1), atol=1e-2)
    if "numba" in BACKENDS.runnable(x.device):
        assert BACKENDS.select("auto", x.device, dtype=torch.float32) == "numba"
