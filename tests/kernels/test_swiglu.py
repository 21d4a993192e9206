"""gf.swiglu on every backend that runs here, forward and backward, against float64: odd sizes, every dtype,
non-contiguous inputs, saturated gates, empty tensors, and the op's torch.library contract."""

import pytest
import torch
import torch.nn.functional as F

import gpuforge as gf
from gpuforge.kernels._selfcheck import outputs_and_grads
from gpuforge.kernels.swiglu import BACKENDS, swiglu_float64
from tests.helpers import REL_TOL, assert_close_rel, max_rel_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKEND_PARAMS = BACKENDS.runnable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
TRITON = "triton" in BACKEND_PARAMS


def assert_matches(gate, up, dy, backend):
    """y, d gate, d up against float64, within max(REL_TOL, 2x the error of F.silu(gate) * up in the dtype)."""
    got = outputs_and_grads(lambda a, b: gf.swiglu(a, b, backend=backend), (gate, up), dy)
    want = outputs_and_grads(swiglu_float64, (gate.double(), up.double()), dy.double())
    same = outputs_and_grads(lambda a, b: F.silu(a) * b, (gate, up), dy)
    for name, mine, ref, theirs in zip(("y", "d gate", "d up"), got, want, same, strict=True):
        assert mine.dtype == gate.dtype and mine.shape == gate.shape and mine.is_contiguous(), name
        assert_close_rel(mine, ref, max(REL_TOL[gate.dtype], 2 * max_rel_error(theirs, ref)), name)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 97), (2, 5, 130), (1000, 3)])
def test_matches_float64(backend, dtype, shape, device):
    g = torch.Generator().manual_seed(sum(shape))
    gate, up, dy = ((3 * torch.randn(shape, generator=g)).to(device=device, dtype=dtype) for _ in range(3))
    assert_matches(gate, up, dy, backend)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # exp(200) = inf, in numpy
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_saturated_gates_stay_finite(backend, device):
    """sigmoid saturates to 0 and 1 at |gate| ~ 90: silu → 0 and gate; no NaN or overflow in either pass."""
    gate = torch.tensor([-200.0, -90.0, -30.0, 0.0, 30.0, 90.0, 200.0], device=device)
    up, dy = torch.full_like(gate, 0.5), torch.ones_like(gate)
    assert_matches(gate, up, dy, backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_non_contiguous_inputs(backend, device):
    base = torch.randn(6, 40, device=device)
    gate, up = base[:, ::2], torch.randn(20, 6, device=device).t()
    assert not gate.is_contiguous() and not up.is_contiguous()
    assert_matches(gate, up, torch.randn(20, 12, device=device).t()[::2], backend)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_empty_inputs(backend, device):
    gate = torch.empty(0, 5, device=device, requires_grad=True)
    y = gf.swiglu(gate, torch.empty(0, 5, device=device), backend=backend)
    y.sum().backward()
    assert y.shape == (0, 5) and gate.grad.shape == (0, 5)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_opcheck(backend, device):
    gate, up = (torch.randn(3, 17, device=device, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.gpuforge.swiglu.default, (gate, up, backend))
    torch.library.opcheck(torch.ops.gpuforge.swiglu_backward.default,
                          (torch.randn(3, 17, device=device), gate.detach(), up.detach(), backend))


def test_gradcheck_float64():
    gate, up = (torch.randn(3, 4, dtype=torch.float64, requires_grad=True) for _ in range(2))
    assert torch.autograd.gradcheck(lambda a, b: torch.ops.gpuforge.swiglu(a, b, "torch"), (gate, up))


@pytest.mark.skipif(not TRITON, reason="triton cannot run here")
def test_torch_compile_fullgraph(device):
    """Llama's feed-forward: down(swiglu(gate_proj(x), up_proj(x)))."""
    x, w_gate, w_up, w_down = (torch.randn(*s, device=device) for s in ((5, 8), (16, 8), (16, 8), (8, 16)))
    mlp = torch.compile(lambda x, a, b, c: gf.swiglu(x @ a.T, x @ b.T, backend="triton") @ c.T, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, w_gate, w_up, w_down)]
    out = mlp(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (x, w_gate, w_up, w_down)]
    ref = swiglu_float64(leaves64[0] @ leaves64[1].T, leaves64[0] @ leaves64[2].T) @ leaves64[3].T
    assert_close_rel(out, ref, REL_TOL[torch.float32])
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), leaves64), strict=True):
        assert_close_rel(got, want, 2 * REL_TOL[torch.float32], "grad")


def test_exported_from_package():
    assert gf.swiglu is gf.kernels.swiglu.swiglu and "swiglu" in gf.__all__


@pytest.mark.parametrize("gate, up, error, match", [
    ([1.0], torch.ones(1), TypeError, "gate: expected a torch.Tensor"),
    (torch.ones(3), torch.ones(3, dtype=torch.int32), TypeError, "up: expected dtype"),
    (torch.ones(3), torch.ones(3).half(), TypeError, "up: expected dtype torch.float32"),
    (torch.ones(3), torch.ones(4), ValueError, r"up: expected shape \(3,\)"),
    (torch.ones(3), torch.ones(3, device="meta"), ValueError, "up: expected device cpu"),
])
def test_bad_input_names_the_argument(gate, up, error, match):
    with pytest.raises(error, match=match):
        gf.swiglu(gate, up)


def test_benchmark_cases_compute_the_reference():
    from gpuforge.kernels._selfcheck import relative_error
    from gpuforge.profiling.bench_swiglu import bench_cases

    for case in bench_cases(torch.device("cpu"), quick=True):
        inputs = case.make_inputs()
        want = case.reference(*[t.double() for t in inputs])
        want = want if isinstance(want, tuple) else (want,)
        for label, fn in case.fns.items():
            got = fn(*inputs)
            for g, w in zip(got if isinstance(got, tuple) else (got,), want, strict=True):
                assert relative_error(g, w) <= 1e-5, (case.shape, label)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4096, 11008), (3, 1 << 20)])
def test_gpu_numerics(dtype, shape):
    gate, up, dy = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
    assert_matches(gate, up, dy, "triton")
