"""gf.layer_norm (with and without weight/bias, plain and with the fused residual add) on every backend that runs
here, forward and backward, against float64; the streamed kernels for wide rows (256K elements); the deterministic
weight/bias gradients; and the ops' torch.library contract."""

import pytest
import torch
import torch.nn.functional as F

import gpuforge as gf
from gpuforge.kernels import backends
from gpuforge.kernels.layer_norm import BACKENDS, layer_norm_float64
from tests.helpers import REL_TOL, assert_close_rel, max_rel_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Gradients sum over rows and columns: a few ulps more than the forward. The interpreter truncates fp32 -> bf16
# stores (a GPU rounds), which the bf16 floor covers.
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}
BACKEND_PARAMS = BACKENDS.runnable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
TRITON = "triton" in BACKEND_PARAMS


def make_inputs(rows, n, dtype, device, seed=0, affine="wb", residual=False):
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(rows, n, generator=g) + 1  # a mean and a spread, so both statistics matter
    dy, r = torch.randn(rows, n, generator=g), torch.randn(rows, n, generator=g)
    w = 1 + 0.5 * torch.randn(n, generator=g) if "w" in affine else None
    b = 0.5 * torch.randn(n, generator=g) if "b" in affine else None
    cast = lambda t: t.to(device=device, dtype=dtype) if t is not None else None  # noqa: E731
    return cast(x), cast(w), cast(b), cast(dy), cast(r) if residual else None


def outputs(fn, x, w, b, r, dy):
    """(y, h, dx, dw, db, dr) of fn(x, w, b, r) -> y or (y, h), None where an input or output is absent."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, r)]
    out = fn(*leaves)
    y, h = (out, None) if r is None else out
    wrt = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(y, wrt, dy))
    return (y.detach(), h.detach() if h is not None else None, *(next(grads) if t is not None else None
                                                                 for t in leaves))


def gf_outputs(x, w, b, r, dy, backend, eps=1e-5, deterministic=True):
    return outputs(lambda *t: gf.layer_norm(t[0], t[1], t[2], eps, residual=t[3], backend=backend,
                                            deterministic=deterministic), x, w, b, r, dy)


def reference(x, w, b, r, dy, eps=1e-5, dtype=torch.float64):
    """The same outputs from torch's F.layer_norm in `dtype` (float64: the oracle; x's dtype: the same-precision
    computation flash-attention's rule compares with)."""
    def fn(x, w, b, r):
        h = x + r if r is not None else x
        y = F.layer_norm(h, h.shape[-1:], w, b, eps)
        return y if r is None else (y, h)

    cast = lambda t: t.to(dtype) if t is not None else None  # noqa: E731
    return outputs(fn, *(cast(t) for t in (x, w, b, r)), cast(dy))


def assert_matches(got, x, w, b, r, dy, eps=1e-5):
    """Each output against float64, within max(its tolerance, 2x the error of F.layer_norm in x's dtype)."""
    want = reference(x, w, b, r, dy, eps)
    same = reference(x, w, b, r, dy, eps, x.dtype)
    for name, mine, ref, theirs, tol in zip(("y", "h", "dx", "dw", "db", "d residual"), got, want, same,
                                            (REL_TOL, REL_TOL) + (GRAD_TOL,) * 4, strict=True):
        assert (mine is None) == (ref is None), name
        if mine is not None:
            assert mine.dtype == x.dtype and mine.shape == ref.shape, name
            assert_close_rel(mine, ref, max(tol[x.dtype], 2 * max_rel_error(theirs, ref)), name)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n, affine", [(1, 1, "wb"), (97, 130, "w"), (5, 1000, "wb"), (3, 7, "")])
def test_matches_float64(backend, dtype, rows, n, affine, device):
    x, w, b, dy, _ = make_inputs(rows, n, dtype, device, seed=rows * 7 + n, affine=affine)
    assert_matches(gf_outputs(x, w, b, None, dy, backend), x, w, b, None, dy)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_residual(backend, dtype, device):
    x, w, b, dy, r = make_inputs(29, 130, dtype, device, seed=3, residual=True)
    assert_matches(gf_outputs(x, w, b, r, dy, backend), x, w, b, r, dy)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_fused_residual_gradient_through_h(backend, device):
    """The block's residual stream uses h too: gradients from y and h add up; h alone still backpropagates."""
    x, w, b, dy, r = make_inputs(5, 33, torch.float32, device, seed=4, residual=True)
    dh = torch.randn_like(x)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    y, h = gf.layer_norm(*leaves[:3], residual=leaves[3], backend=backend)
    grads = torch.autograd.grad((y * dy).sum() + (h * dh).sum(), leaves)
    leaves64 = [t.double().requires_grad_() for t in (x, w, b, r)]
    h64 = leaves64[0] + leaves64[3]
    y64 = layer_norm_float64(h64, *leaves64[1:3])
    refs = torch.autograd.grad((y64 * dy.double()).sum() + (h64 * dh.double()).sum(), leaves64)
    for name, got, ref in zip(("dx", "dw", "db", "d residual"), grads, refs, strict=True):
        assert_close_rel(got, ref, GRAD_TOL[torch.float32], name)
    x2 = x.clone().requires_grad_()
    _, h_only = gf.layer_norm(x2, w, b, residual=r, backend=backend)
    assert torch.equal(torch.autograd.grad(h_only.sum(), x2)[0], torch.ones_like(x))


@pytest.mark.skipif(not TRITON, reason="triton cannot run here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, n, affine, residual", [(5, 130, "wb", True), (3, 300, "", False),
                                                       (4, 97, "w", False)])
def test_streamed_kernels_for_wide_rows(dtype, rows, n, affine, residual, device):
    """The Welford forward and the two-kernel backward, reached by lowering the one-pass limit below n, against
    the one-pass kernels' float64 reference; a large mean (100) checks the variance does not cancel."""
    from gpuforge.kernels.triton import layer_norm as triton_layer_norm

    limits = {"max_one_pass": 64, "block": 32}
    x, w, b, dy, r = make_inputs(rows, n, dtype, device, seed=n, affine=affine, residual=residual)
    x = x + 100
    y, h, mean, rstd = triton_layer_norm.forward(x, w, b, r, 1e-5, **limits)
    dx, dw, db = triton_layer_norm.backward(dy, h if h is not None else x, w, mean, rstd, None, True, **limits)
    got = (y, h, dx, dw if w is not None else None, db if b is not None else None, dx if r is not None else None)
    assert_matches(got, x, w, b, r, dy)
    atomic = triton_layer_norm.backward(dy, h if h is not None else x, w, mean, rstd, None, False, **limits)
    assert torch.equal(atomic[0], dx)
    assert_close_rel(atomic[1], dw, GRAD_TOL[dtype], "dw (atomics)")


@pytest.mark.skipif(not TRITON, reason="triton cannot run here")
def test_rows_of_256k_elements(device):
    """Rows wider than any register file: 2^18 + 3 elements through the public API (streamed kernels)."""
    x, w, b, dy, _ = make_inputs(2, 2 ** 18 + 3, torch.float32, device, seed=11)
    assert_matches(gf_outputs(x, w, b, None, dy, "triton"), x, w, b, None, dy)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_deterministic_gradients_are_bit_identical(backend, device):
    x, w, b, dy, r = make_inputs(37, 130, torch.float32, device, seed=5, residual=True)
    first = gf_outputs(x, w, b, r, dy, backend)
    for mine, again in zip(first, gf_outputs(x, w, b, r, dy, backend), strict=True):
        assert torch.equal(mine, again)
    atomic = gf_outputs(x, w, b, r, dy, backend, deterministic=False)
    assert torch.equal(atomic[2], first[2])  # dx does not depend on the reduction
    assert_close_rel(atomic[3], first[3], GRAD_TOL[torch.float32], "dw (atomics)")
    assert_close_rel(atomic[4], first[4], GRAD_TOL[torch.float32], "db (atomics)")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("layout", ["row_stride", "last_dim_stride", "transposed_3d"])
def test_non_contiguous_inputs(backend, layout, device):
    g = torch.Generator().manual_seed(1)
    if layout == "row_stride":
        x = torch.randn(11, 50, generator=g).to(device)[:, 5:42]
    elif layout == "last_dim_stride":
        x = torch.randn(11, 74, generator=g).to(device)[:, ::2]
    else:
        x = torch.randn(37, 4, 6, generator=g).to(device).permute(1, 2, 0)
    assert not x.is_contiguous()
    n = x.shape[-1]
    w = (1 + torch.randn(n, generator=g)).to(device)[None].expand(2, n)[1]
    b = torch.randn(2 * n, generator=g).to(device)[::2]
    dy = torch.randn(x.shape, generator=g).to(device)
    assert_matches(gf_outputs(x, w, b, None, dy, backend), x, w, b, None, dy)


def test_empty_batch(device):
    x = torch.randn(0, 5, device=device, requires_grad=True)
    w = torch.ones(5, device=device, requires_grad=True)
    b = torch.zeros(5, device=device, requires_grad=True)
    y = gf.layer_norm(x, w, b)
    y.sum().backward()
    assert y.shape == (0, 5) and torch.equal(w.grad, torch.zeros(5, device=device))
    assert torch.equal(b.grad, torch.zeros(5, device=device))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_matches_torch_functional_with_eps(backend, device):
    x, w, b, _, _ = make_inputs(6, 24, torch.float32, device, seed=9)
    x = 1e-3 * x.view(2, 3, 24)  # small values make eps matter
    torch.testing.assert_close(gf.layer_norm(x, w, b, 1e-4, backend=backend), F.layer_norm(x, (24,), w, b, 1e-4))


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_opcheck(backend, device):
    x, w, b, dy, r = make_inputs(5, 33, torch.float32, device, seed=4, residual=True)
    xg, wg, bg, rg = (t.clone().requires_grad_() for t in (x, w, b, r))
    ops = torch.ops.gpuforge
    torch.library.opcheck(ops.layer_norm.default, (xg, wg, bg, 1e-5, backend, True))
    torch.library.opcheck(ops.layer_norm.default, (xg, None, None, 1e-5, backend, True))
    torch.library.opcheck(ops.add_layer_norm.default, (xg, rg, wg, None, 1e-5, backend, True))
    _, mean, rstd = ops.layer_norm(x, w, b, 1e-5, backend, True)
    torch.library.opcheck(ops.layer_norm_backward.default, (dy, x, w, mean, rstd, r, backend, True))


def test_gradcheck_float64():
    x, r = (torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(6, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ops = torch.ops.gpuforge
    assert torch.autograd.gradcheck(lambda a, c, d: ops.layer_norm(a, c, d, 1e-5, "torch", True)[0], (x, w, b))
    assert torch.autograd.gradcheck(lambda a: ops.layer_norm(a, None, None, 1e-5, "torch", True)[0], (x,))
    assert torch.autograd.gradcheck(
        lambda a, e, c, d: ops.add_layer_norm(a, e, c, d, 1e-5, "torch", True)[:2], (x, r, w, b))


@pytest.mark.skipif(not TRITON, reason="triton cannot run here")
def test_torch_compile_fullgraph(device):
    x, w, b, dy, r = make_inputs(4, 40, torch.float32, device, seed=6, residual=True)

    def block(x, r, w, b):
        y, h = gf.layer_norm(x, w, b, residual=r, backend="triton")
        return torch.relu(gf.layer_norm(y * 2, w, None, backend="triton")) + h

    leaves = [t.clone().requires_grad_() for t in (x, r, w, b)]
    out = torch.compile(block, fullgraph=True)(*leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    leaves64 = [t.double().requires_grad_() for t in (x, r, w, b)]
    h64 = leaves64[0] + leaves64[1]
    ref = torch.relu(layer_norm_float64(layer_norm_float64(h64, *leaves64[2:]) * 2, leaves64[2])) + h64
    assert_close_rel(out, ref, REL_TOL[torch.float32])
    for got, want in zip(grads, torch.autograd.grad(ref, leaves64, dy.double()), strict=True):
        assert_close_rel(got, want, GRAD_TOL[torch.float32], "grad")


def test_exported_from_package():
    assert gf.layer_norm is gf.kernels.layer_norm.layer_norm and "layer_norm" in gf.__all__


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(weight=torch.ones(5)), ValueError, r"weight: expected shape \(4,\)"),
    (dict(bias=torch.ones(1, 4)), ValueError, r"bias: expected shape \(4,\)"),
    (dict(x=torch.ones(3, 4, dtype=torch.int32)), TypeError, "x: expected dtype"),
    (dict(bias=torch.ones(4, dtype=torch.float16)), TypeError, "bias: expected dtype torch.float32"),
    (dict(weight=torch.ones(4, device="meta")), ValueError, "weight: expected device cpu"),
    (dict(eps=0.0), ValueError, "eps: expected a positive finite float"),
    (dict(eps=float("nan")), ValueError, "eps: expected a positive finite float"),
    (dict(residual=torch.ones(3, 5)), ValueError, r"residual: expected shape \(3, 4\)"),
    (dict(residual=torch.ones(3, 4, dtype=torch.bfloat16)), TypeError, "residual: expected dtype"),
    (dict(x=torch.ones(3, 0), weight=None), ValueError, "x: expected a non-empty last dim"),
    (dict(x=torch.tensor(1.0), weight=None), ValueError, "x: expected at least 1 dims"),
    (dict(x=[1.0, 2.0]), TypeError, "x: expected a torch.Tensor"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(x=torch.ones(3, 4), weight=torch.ones(4), bias=torch.zeros(4), eps=1e-5) | kwargs
    with pytest.raises(error, match=match):
        gf.layer_norm(**args)


def test_auto_on_cuda_picks_triton_at_any_width():
    """No width limit: the streamed kernels take rows of any length."""
    if not backends.is_available("triton")[0]:
        pytest.skip("triton cannot run here")
    assert BACKENDS.select("auto", torch.device("cuda"), dtype=torch.bfloat16, width=2 ** 20) == "triton"


def test_benchmark_cases_compute_the_reference():
    from gpuforge.kernels._selfcheck import relative_error
    from gpuforge.profiling.bench_layer_norm import bench_cases

    cases = bench_cases(torch.device("cpu"), quick=True)
    assert {c.shape.split()[-1] for c in cases} == {"fwd", "fwd+bwd"}
    for case in cases:
        inputs = case.make_inputs()
        want = case.reference(*[t.double() for t in inputs])
        want = want if isinstance(want, tuple) else (want,)
        assert set(case.fns) >= set(BACKEND_PARAMS)
        for label, fn in case.fns.items():
            got = fn(*inputs)
            for g, w in zip(got if isinstance(got, tuple) else (got,), want, strict=True):
                assert relative_error(g, w) <= 2 * GRAD_TOL[case.dtype], (case.shape, label)


# --- GPU numerics: large shapes, bf16 error at most 2x that of torch's own bf16 -------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows, n", [(4096, 4096), (1000, 8192), (257, 8193), (16, 65536 * 4)])
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_numerics(dtype, rows, n, fused):
    x, w, b, dy, r = make_inputs(rows, n, dtype, torch.device("cuda"), seed=rows, residual=fused)
    assert_matches(gf_outputs(x, w, b, r, dy, "triton"), x, w, b, r, dy)
