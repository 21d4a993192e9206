"""gf.rms_norm (plain and with the fused residual add) on every backend that runs here, forward and backward,
against float64, plus the ops' torch.library contract and the deterministic weight gradient."""

import pytest
import torch

import gpuforge as gf
from gpuforge.kernels import backends
from gpuforge.kernels.rms_norm import BACKENDS, rms_norm_float64
from tests.helpers import REL_TOL, assert_close_rel, max_rel_error

CUDA_MAX_N = BACKENDS.limits["cuda"].max_width
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# fp32 gradients sum over rows and columns: a few ulps more than the forward.
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def runnable_backends(device):
    return BACKENDS.runnable(device)


BACKEND_PARAMS = runnable_backends(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def make_inputs(rows, n, dtype, device, seed=0, residual=False):
    g = torch.Generator().manual_seed(seed)
    x, dy, r = (torch.randn(rows, n, generator=g) for _ in range(3))
    w = 1 + 0.5 * torch.randn(n, generator=g)
    out = [t.to(device=device, dtype=dtype) for t in (x, w, dy)]
    return (*out, r.to(device=device, dtype=dtype) if residual else None)


def float64_outputs(x, w, dy, r=None, eps=1e-6):
    """(y, h, dx, dw, dr) in float64 by autograd of the textbook formula; h and dr are None without r."""
    leaves = [t.detach().double().requires_grad_() for t in (x, w)]
    r64 = r.detach().double().requires_grad_() if r is not None else None
    h = leaves[0] + r64 if r64 is not None else leaves[0]
    y = rms_norm_float64(h, leaves[1], eps)
    grads = torch.autograd.grad(y, leaves + ([r64] if r64 is not None else []), dy.double())
    return y.detach(), (h.detach() if r64 is not None else None), grads[0], grads[1], \
        (grads[2] if r64 is not None else None)


def gf_outputs(x, w, dy, r=None, backend="auto", deterministic=True, eps=1e-6):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w)]
    r_leaf = r.detach().clone().requires_grad_() if r is not None else None
    out = gf.rms_norm(leaves[0], leaves[1], eps, residual=r_leaf, backend=backend,
                      deterministic=deterministic)
    y, h = (out, None) if r is None else out
    grads = torch.autograd.grad(y, leaves + ([r_leaf] if r_leaf is not None else []), dy)
    return y.detach(), (h.detach() if h is not None else None), grads[0], grads[1], \
        (grads[2] if r is not None else None)


def assert_dx_close(dx, ref_dx, x, w, dy, tol):
    """dx relative to its float64 value; for n = 1, dx = g·eps·rstd³ is the cancellation of two equal terms,
    so it is measured against the size of those terms (|dy·w|·rstd) instead."""
    if x.shape[-1] > 1:
        assert_close_rel(dx, ref_dx, tol, "dx")
        return
    scale = (dy.double() * w.double() * torch.rsqrt(x.double().square() + 1e-6)).abs().max().item()
    assert torch.isfinite(dx).all(), "dx has NaN/Inf"
    assert (dx.double() - ref_dx).abs().max().item() <= tol * max(scale, 1e-30)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", (1, 3, 97))
@pytest.mark.parametrize("n", (1, 7, 130, 1000))
def test_matches_float64(backend, dtype, rows, n, device):
    x, w, dy, _ = make_inputs(rows, n, dtype, device, seed=rows * 7 + n)
    y, _, dx, dw, _ = gf_outputs(x, w, dy, backend=backend)
    ref_y, _, ref_dx, ref_dw, _ = float64_outputs(x, w, dy)
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    assert_close_rel(y, ref_y, REL_TOL[dtype], "y")
    assert_dx_close(dx, ref_dx, x, w, dy, GRAD_TOL[dtype])
    assert_close_rel(dw, ref_dw, GRAD_TOL[dtype], "dw")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n", [(29, 130), (3, 1000)])
def test_fused_residual(backend, dtype, rows, n, device):
    x, w, dy, r = make_inputs(rows, n, dtype, device, seed=n, residual=True)
    y, h, dx, dw, dr = gf_outputs(x, w, dy, r, backend=backend)
    ref_y, ref_h, ref_dx, ref_dw, ref_dr = float64_outputs(x, w, dy, r)
    assert_close_rel(h, ref_h, REL_TOL[dtype], "h")
    assert_close_rel(y, ref_y, 2 * REL_TOL[dtype], "y")  # h is rounded to dtype before the norm, as returned
    assert_close_rel(dx, ref_dx, GRAD_TOL[dtype], "dx")
    assert_close_rel(dr, ref_dr, GRAD_TOL[dtype], "d residual")
    assert_close_rel(dw, ref_dw, GRAD_TOL[dtype], "dw")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_fused_residual_gradient_through_h(backend, device):
    """The block's residual stream uses h too: gradients from y and h add up (dx = d_norm + dh)."""
    x, w, dy, r = make_inputs(5, 33, torch.float32, device, seed=3, residual=True)
    dh = torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, w, r)]
    y, h = gf.rms_norm(leaves[0], leaves[1], residual=leaves[2], backend=backend)
    grads = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (x, w, r)]
    h64 = leaves64[0] + leaves64[2]
    y64 = rms_norm_float64(h64, leaves64[1])
    refs = torch.autograd.grad((y64 * dy.double()).sum() + (h64 * dh.double()).sum(), leaves64)
    for name, got, ref in zip(("dx", "dw", "d residual"), grads, refs, strict=True):
        assert_close_rel(got, ref, GRAD_TOL[torch.float32], name)
    # only h used: the norm's backward still runs, with a zero gradient for y
    x2 = x.clone().requires_grad_()
    _, h_only = gf.rms_norm(x2, w, residual=r, backend=backend)
    (grad_x,) = torch.autograd.grad(h_only.sum(), x2)
    assert torch.equal(grad_x, torch.ones_like(x))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("layout", ["row_stride", "last_dim_stride", "transposed_3d"])
def test_non_contiguous_inputs(backend, layout, device):
    g = torch.Generator().manual_seed(1)
    if layout == "row_stride":  # rows of 37 inside rows of 50: a strided 2-D view, no copy needed
        base = torch.randn(11, 50, generator=g).to(device)
        x = base[:, 5:42]
    elif layout == "last_dim_stride":
        base = torch.randn(11, 74, generator=g).to(device)
        x = base[:, ::2]
    else:
        base = torch.randn(37, 4, 6, generator=g).to(device)
        x = base.permute(1, 2, 0)  # (4, 6, 37), last dim strided
    assert not x.is_contiguous()
    n = x.shape[-1]
    w = (1 + torch.randn(n, generator=g)).to(device)[None].expand(2, n)[1]  # a view of a broadcast row
    dy = torch.randn(x.shape, generator=g).to(device)
    y, _, dx, dw, _ = gf_outputs(x, w, dy, backend=backend)
    ref_y, _, ref_dx, ref_dw, _ = float64_outputs(x, w, dy)
    assert y.shape == x.shape and dx.shape == x.shape
    assert_close_rel(y, ref_y, REL_TOL[torch.float32], "y")
    assert_close_rel(dx, ref_dx, GRAD_TOL[torch.float32], "dx")
    assert_close_rel(dw, ref_dw, GRAD_TOL[torch.float32], "dw")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_deterministic_weight_gradient_is_bit_identical(backend, device):
    x, w, dy, r = make_inputs(37, 130, torch.float32, device, seed=5, residual=True)
    first = gf_outputs(x, w, dy, r, backend=backend, deterministic=True)
    again = gf_outputs(x, w, dy, r, backend=backend, deterministic=True)
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)
    atomic = gf_outputs(x, w, dy, r, backend=backend, deterministic=False)
    ref_dw = float64_outputs(x, w, dy, r)[3]
    assert_close_rel(atomic[3], ref_dw, GRAD_TOL[torch.float32], "dw (atomics)")
    assert torch.equal(atomic[2], first[2])  # dx does not depend on the reduction


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_batched_shape_and_eps(backend, device):
    x, w, dy, _ = make_inputs(6, 24, torch.float32, device, seed=9)
    x3 = x.view(2, 3, 24) * 1e-3  # small values make eps matter
    y = gf.rms_norm(x3, w, 1e-4, backend=backend)
    assert y.shape == (2, 3, 24)
    assert_close_rel(y, rms_norm_float64(x3, w, 1e-4), REL_TOL[torch.float32])


def test_empty_batch(device):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    w = torch.ones(5, device=device, requires_grad=True)
    y = gf.rms_norm(x, w)
    y.sum().backward()
    assert y.shape == (0, 5) and torch.equal(w.grad, torch.zeros(5, device=device))


def test_matches_torch_functional():
    x, w, _, _ = make_inputs(4, 33, torch.float32, torch.device("cpu"), seed=2)
    torch.testing.assert_close(gf.rms_norm(x, w, 1e-5), torch.nn.functional.rms_norm(x, (33,), w, 1e-5))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_opcheck(backend, device):
    x, w, dy, r = make_inputs(5, 33, torch.float32, device, seed=4, residual=True)
    xg, wg, rg = (t.clone().requires_grad_() for t in (x, w, r))
    torch.library.opcheck(torch.ops.gpuforge.rms_norm.default, (xg, wg, 1e-6, backend, True))
    torch.library.opcheck(torch.ops.gpuforge.add_rms_norm.default, (xg, rg, wg, 1e-6, backend, True))
    rstd = torch.ops.gpuforge.rms_norm(x, w, 1e-6, backend, True)[1]
    torch.library.opcheck(torch.ops.gpuforge.rms_norm_backward.default, (dy, x, w, rstd, r, backend, True))


def test_gradcheck_float64():
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: torch.ops.gpuforge.rms_norm(a, b, 1e-6, "torch", True)[0], (x, w))
    assert torch.autograd.gradcheck(
        lambda a, c, b: torch.ops.gpuforge.add_rms_norm(a, c, b, 1e-6, "torch", True)[:2], (x, r, w))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_torch_compile_fullgraph(backend, device):
    x, w, dy, r = make_inputs(4, 40, torch.float32, device, seed=6, residual=True)

    def block(x, r, w):
        y, h = gf.rms_norm(x, w, residual=r, backend=backend)
        return torch.relu(gf.rms_norm(y * 2, w, backend=backend)) + h

    compiled = torch.compile(block, fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (x, r, w)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    leaves64 = [t.double().requires_grad_() for t in (x, r, w)]
    h64 = leaves64[0] + leaves64[1]
    ref = torch.relu(rms_norm_float64(rms_norm_float64(h64, leaves64[2]) * 2, leaves64[2])) + h64
    refs = torch.autograd.grad(ref, leaves64, dy.double())
    assert_close_rel(out, ref, REL_TOL[torch.float32])
    for got, want in zip(grads, refs, strict=True):
        assert_close_rel(got, want, GRAD_TOL[torch.float32], "grad")


def test_exported_from_package():
    assert gf.rms_norm is gf.kernels.rms_norm.rms_norm
    assert "rms_norm" in gf.__all__


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight=torch.ones(5)), ValueError, r"weight: expected shape \(4,\)"),
    (dict(weight=torch.ones(1, 4)), ValueError, r"weight: expected shape \(4,\)"),
    (dict(x=torch.ones(3, 4, dtype=torch.int32)), TypeError, "x: expected dtype"),
    (dict(weight=torch.ones(4, dtype=torch.float16)), TypeError, "weight: expected dtype torch.float32"),
    (dict(weight=torch.ones(4, device="meta")), ValueError, "weight: expected device cpu"),
    (dict(eps=0.0), ValueError, "eps: expected a positive finite float"),
    (dict(eps=float("inf")), ValueError, "eps: expected a positive finite float"),
    (dict(eps=-1e-6), ValueError, "eps: expected a positive finite float"),
    (dict(residual=torch.ones(3, 5)), ValueError, r"residual: expected shape \(3, 4\)"),
    (dict(residual=torch.ones(3, 4, dtype=torch.bfloat16)), TypeError, "residual: expected dtype"),
    (dict(x=torch.ones(3, 0), weight=torch.ones(0)), ValueError, "x: expected a non-empty last dim"),
    (dict(x=[1.0, 2.0]), TypeError, "x: expected a torch.Tensor"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(x=torch.ones(3, 4), weight=torch.ones(4), eps=1e-6) | kwargs
    with pytest.raises(error, match=match):
        gf.rms_norm(**args)


@pytest.mark.parametrize("backend", ["cuda", "cupy"])
def test_gpu_backends_explain_why_they_cannot_run(backend):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises((RuntimeError, ValueError), match=backend):
        gf.rms_norm(torch.ones(2, 3), torch.ones(3), backend=backend)


def test_extension_bindings_check_arguments_and_report_cuda_errors():
    ext = pytest.importorskip("gpuforge._C", reason="the CUDA extension is not built here")
    forward = dict(x=16, x_row_stride=8, residual=0, residual_row_stride=0, weight=16, y=16, h=0, rstd=16,
                   rows=2, n=8, eps=1e-6, dtype=0, stream=0)
    with pytest.raises(ValueError, match="residual and h"):
        ext.rms_norm_forward(**forward | dict(residual=16))
    with pytest.raises(ValueError, match="eps must be > 0"):
        ext.rms_norm_forward(**forward | dict(eps=0.0))
    with pytest.raises(ValueError, match="n must be >= 1"):
        ext.rms_norm_forward(**forward | dict(n=0))
    with pytest.raises(ValueError, match="unknown dtype code"):
        ext.rms_norm_forward(**forward | dict(dtype=7))
    backward = dict(dy=16, dy_row_stride=8, x=16, x_row_stride=8, weight=16, rstd=16, dh=0, dh_row_stride=0,
                    dx=16, dw=16, partial=16, blocks=1, rows=2, n=8, deterministic=True, dtype=0, stream=0)
    with pytest.raises(ValueError, match="blocks must be >= 1"):
        ext.rms_norm_backward(**backward | dict(blocks=0))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="rms_norm_backward_blocks: CUDA error"):
            ext.rms_norm_backward_blocks(4, 0)


def test_auto_on_cuda_picks_triton_at_any_width():
    """No width limit on Triton: rows past what registers hold take the looped kernels."""
    if not backends.is_available("triton")[0]:
        pytest.skip("triton cannot run here")
    assert BACKENDS.select("auto", torch.device("cuda"), dtype=torch.bfloat16, width=2 ** 20) == "triton"


@pytest.mark.skipif(not backends.is_available("triton")[0], reason="triton cannot run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, n, fused", [(5, 130, True), (3, 300, False), (4, 97, False)])
def test_looped_kernels_for_wide_rows(dtype, rows, n, fused, device):
    """The looped forward and the two-kernel backward, reached by lowering the one-pass limits below n; the
    atomic weight gradient gives the same dx."""
    from gpuforge.kernels.triton import rms_norm as triton_rms_norm

    limits = {"max_one_pass": 64, "block": 32}
    x, w, dy, r = make_inputs(rows, n, dtype, device, seed=n, residual=fused)
    y, h, rstd = triton_rms_norm.forward(x, w, r, 1e-6, **limits)
    dx, dw = triton_rms_norm.backward(dy, h if fused else x, w, rstd, None, True, **limits)
    ref = float64_outputs(x, w, dy, r)
    assert_close_rel(y, ref[0], REL_TOL[dtype], "y")
    if fused:
        assert_close_rel(h, ref[1], REL_TOL[dtype], "h")
    assert_close_rel(dx, ref[2], GRAD_TOL[dtype], "dx")
    assert_close_rel(dw, ref[3], GRAD_TOL[dtype], "dw")
    atomic = triton_rms_norm.backward(dy, h if fused else x, w, rstd, None, False, **limits)
    assert torch.equal(atomic[0], dx)
    assert_close_rel(atomic[1], dw, GRAD_TOL[dtype], "dw (atomics)")


@pytest.mark.gpu
def test_gpu_auto_streams_rows_wider_than_the_cuda_backward_holds():
    """auto takes Triton's looped kernels past the CUDA backward's width limit."""
    x = torch.randn(2, CUDA_MAX_N + 3, device="cuda", requires_grad=True)
    w = torch.randn(x.shape[-1], device="cuda", requires_grad=True)
    y = gf.rms_norm(x, w)
    y.sum().backward()
    assert_close_rel(y, rms_norm_float64(x, w), REL_TOL[torch.float32], "y")
    assert x.grad is not None and w.grad is not None and torch.isfinite(x.grad).all()


def test_benchmark_cases_compute_the_reference():
    """Every timed function of the benchmark computes the op (forward: y; forward+backward: dx, dw)."""
    from gpuforge.kernels._selfcheck import relative_error
    from gpuforge.profiling.bench_rms_norm import bench_cases

    cases = bench_cases(torch.device("cpu"), quick=True)
    assert {c.shape.split()[-1] for c in cases} == {"fwd", "fwd+bwd"}
    for case in cases:
        inputs = case.make_inputs()
        want = case.reference(*[t.double() for t in inputs])
        want = want if isinstance(want, tuple) else (want,)
        assert set(case.fns) >= set(BACKEND_PARAMS)
        for label, fn in case.fns.items():
            got = fn(*inputs)
            got = got if isinstance(got, tuple) else (got,)
            for g, w in zip(got, want, strict=True):
                assert relative_error(g, w) <= 2 * GRAD_TOL[case.dtype], (case.shape, label)


# --- GPU numerics: large shapes, every backend, bf16 error at most 2x that of torch's own bf16 ----------

@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "cupy"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n", [(4096, 4096), (1000, 8192), (257, 4097), (64, 30000)])
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_numerics(backend, dtype, rows, n, fused):
    x, w, dy, r = make_inputs(rows, n, dtype, torch.device("cuda"), seed=rows, residual=fused)
    got = gf_outputs(x, w, dy, r, backend=backend)
    ref = float64_outputs(x, w, dy, r)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()  # torch's own error in the same dtype
    hs = xs + r if fused else xs
    ys = torch.nn.functional.rms_norm(hs, (n,), ws, 1e-6)
    torch_grads = torch.autograd.grad(ys, (xs, ws), dy)
    torch_same = (ys.detach(), torch_grads[0], torch_grads[1])
    for name, mine, theirs, want in zip(("y", "dx", "dw"), (got[0], got[2], got[3]), torch_same,
                                        (ref[0], ref[2], ref[3]), strict=True):
        bound = 2 * max_rel_error(theirs, want) + REL_TOL[dtype] / 4
        assert max_rel_error(mine, want) <= bound, name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "cupy"])
def test_gpu_unaligned_and_deterministic(backend):
    base = torch.randn(301, 1 + 1030, device="cuda", dtype=torch.bfloat16)
    x = base[:, 1:]  # rows start off 16-byte alignment: the scalar path
    w, dy = torch.randn(1030, device="cuda", dtype=torch.bfloat16), torch.randn_like(x)
    got = gf_outputs(x, w, dy, backend=backend)
    ref = float64_outputs(x, w, dy)
    for name, mine, want in zip(("y", "dx", "dw"), (got[0], got[2], got[3]), (ref[0], ref[2], ref[3]),
                                strict=True):
        assert_close_rel(mine, want, GRAD_TOL[torch.bfloat16], name)
    for a, b in zip(got, gf_outputs(x, w, dy, backend=backend), strict=True):
        assert a is None or torch.equal(a, b)
