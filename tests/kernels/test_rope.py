"""gf.rope on every backend that runs here, forward and backward, against HF's formula in float64: both pair
layouts (rotate-half and interleaved), partial rotary, GQA head counts, per-batch and shared tables, HF's
non-contiguous q/k layout, gradients of the tables; and the op's torch.library contract."""

import pytest
import torch

import gpuforge as gf
from gpuforge.kernels.rope import BACKENDS, full_tables, rope_angles, rope_float64, rotate_interleaved
from tests.helpers import REL_TOL, assert_close_rel, max_rel_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKEND_PARAMS = BACKENDS.runnable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
TRITON = "triton" in BACKEND_PARAMS

# (B, Hq, Hkv, S, D, R, table): table "S" is (S, R), "1S" (1, S, R), "BS" (B, S, R)
CONFIGS = [
    (2, 4, 2, 7, 16, 16, "S"),
    (1, 3, 1, 9, 12, 8, "BS"),  # partial rotary: 4 dims pass through
    (2, 2, 2, 5, 8, 8, "1S"),
    (3, 6, 3, 4, 20, 10, "BS"),  # R/2 = 5 pairs: not a power of two
]


def make_inputs(config, dtype, device, interleaved, seed=0):
    b, hq, hkv, s, d, r, table = config
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(b, hq, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    dq, dk = torch.randn(q.shape, generator=g), torch.randn(k.shape, generator=g)
    lead = {"S": (), "1S": (1,), "BS": (b,)}[table]
    angles = 4 * torch.rand(*lead, s, r // 2, generator=g)  # positions up to ~4 rad: every quadrant
    cos, sin = full_tables(angles.cos(), angles.sin(), interleaved=interleaved)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, cos, sin, dq, dk))


def run(fn, q, k, cos, sin, dq, dk, table_grads=False):
    """(q_out, k_out, dq, dk[, dcos, dsin]) of fn(q, k, cos, sin) -> (q_out, k_out), fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() for t in ((q, k, cos, sin) if table_grads else (q, k))]
    out = fn(*leaves, *(() if table_grads else (cos, sin)))
    return (*(o.detach() for o in out), *torch.autograd.grad(out, leaves, (dq, dk)))


def float64_oracle(interleaved):
    return lambda q, k, cos, sin: (rope_float64(q, cos, sin, interleaved), rope_float64(k, cos, sin, interleaved))


def same_precision(interleaved):
    """HF's formula in the inputs' own dtype (each product rounded), as a bf16/fp16 HF model computes it."""
    def fn(q, k, cos, sin):
        r = cos.shape[-1]
        c, s = cos.reshape(-1, 1, *cos.shape[-2:]), sin.reshape(-1, 1, *sin.shape[-2:])

        def one(x):
            x_rot = x[..., :r]
            x1, x2 = (x_rot[..., 0::2], x_rot[..., 1::2]) if interleaved else (x_rot[..., :r // 2], x_rot[..., r // 2:])
            swapped = torch.stack((-x2, x1), -1).flatten(-2) if interleaved else torch.cat((-x2, x1), -1)
            return torch.cat((x_rot * c + swapped * s, x[..., r:]), -1)
        return one(q), one(k)
    return fn


def assert_matches(got, inputs, interleaved, table_grads=False):
    want = run(float64_oracle(interleaved), *(t.double() for t in inputs), table_grads=table_grads)
    same = run(same_precision(interleaved), *inputs, table_grads=table_grads)
    dtype = inputs[0].dtype
    for name, mine, ref, theirs in zip(("q_out", "k_out", "dq", "dk", "dcos", "dsin"), got, want, same):
        assert mine.shape == ref.shape and mine.dtype == dtype, name
        # table gradients sum over heads and batch: a few ulps more
        tol = REL_TOL[dtype] * (4 if name.startswith("dc") or name.startswith("ds") else 1)
        assert_close_rel(mine, ref, max(tol, 2 * max_rel_error(theirs, ref)), name)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "B{}-Hq{}-Hkv{}-S{}-D{}-R{}-{}".format(*c))
def test_matches_float64(backend, dtype, interleaved, config, device):
    inputs = make_inputs(config, dtype, device, interleaved, seed=config[4])
    got = run(lambda *t: gf.rope(*t, interleaved=interleaved, backend=backend), *inputs)
    assert all(t.is_contiguous() for t in got)
    assert_matches(got, inputs, interleaved)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_hf_layout_non_contiguous_inputs(backend, device):
    """HF's q/k: projections viewed (B, S, H, D) and transposed to (B, H, S, D); the gradients arrive in any
    layout too."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 7, 4, 16, generator=g).to(device).transpose(1, 2)
    k = torch.randn(2, 7, 2, 32, generator=g).to(device)[..., ::2].transpose(1, 2)  # last dim strided
    _, _, cos, sin, _, _ = make_inputs((2, 4, 2, 7, 16, 12, "BS"), torch.float32, device, False)
    dq, dk = torch.randn(2, 16, 7, 4, generator=g).to(device).permute(0, 3, 2, 1), torch.randn(k.shape).to(device)
    assert not q.is_contiguous() and not k.is_contiguous() and not dq.is_contiguous()
    got = run(lambda *t: gf.rope(*t, backend=backend), q, k, cos, sin, dq, dk)
    assert_matches(got, (q, k, cos, sin, dq, dk), False)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_backward_is_the_rotation_by_minus_the_angle(backend, device):
    q, k, cos, sin, dq, dk = make_inputs(CONFIGS[0], torch.float32, device, False)
    got = run(lambda *t: gf.rope(*t, backend=backend), q, k, cos, sin, dq, dk)
    inverse = gf.rope(dq, dk, cos, -sin, backend=backend)
    assert_close_rel(got[2], inverse[0], REL_TOL[torch.float32], "dq")
    assert_close_rel(got[3], inverse[1], REL_TOL[torch.float32], "dk")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_interleaved_matches_the_reference_models_rotation(backend, device):
    """gf.rope(interleaved=True) on rope_angles' tables is the rotation models/_layers.py applies."""
    cos, sin = rope_angles(16, 9)
    x = torch.randn(2, 3, 9, 16, device=device)
    full_cos, full_sin = (t.float().to(device) for t in full_tables(cos, sin, interleaved=True))
    q_out, _ = gf.rope(x, x[:, :1], full_cos, full_sin, interleaved=True, backend=backend)
    assert_close_rel(q_out, rotate_interleaved(x.double(), cos.to(device), sin.to(device)), REL_TOL[torch.float32])


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("table", ["S", "BS"])
def test_gradients_of_the_tables(backend, table, device):
    inputs = make_inputs((2, 3, 1, 5, 8, 6, table), torch.float32, device, False)
    got = run(lambda *t: gf.rope(*t, backend=backend), *inputs, table_grads=True)
    assert_matches(got, inputs, False, table_grads=True)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_empty_inputs(backend, device):
    cos = sin = torch.ones(0, 8, device=device)
    q, k = gf.rope(torch.ones(2, 4, 0, 8, device=device), torch.ones(2, 1, 0, 8, device=device), cos, sin,
                   backend=backend)
    assert q.shape == (2, 4, 0, 8) and k.shape == (2, 1, 0, 8)
    cos = sin = torch.ones(3, 8, device=device)
    q = torch.randn(1, 2, 3, 8, device=device, requires_grad=True)
    q_out, k_out = gf.rope(q, torch.ones(1, 0, 3, 8, device=device), cos, sin, backend=backend)
    assert k_out.shape == (1, 0, 3, 8)
    q_out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_opcheck(backend, device):
    q, k, cos, sin, dq, dk = make_inputs(CONFIGS[1], torch.float32, device, False)
    qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
    torch.library.opcheck(torch.ops.gpuforge.rope.default, (qg, kg, cos, sin, False, backend))
    torch.library.opcheck(torch.ops.gpuforge.rope.default, (qg, kg, cos, sin, True, backend))
    torch.library.opcheck(torch.ops.gpuforge.rope_backward.default, (dq, dk, cos, sin, False, backend))


def test_gradcheck_float64():
    inputs = make_inputs((2, 2, 1, 3, 6, 4, "BS"), torch.float64, torch.device("cpu"), True)
    leaves = [t.requires_grad_() for t in inputs[:4]]
    for interleaved in (False, True):
        assert torch.autograd.gradcheck(
            lambda *t, i=interleaved: torch.ops.gpuforge.rope(*t, i, "torch"), leaves)


@pytest.mark.skipif(not TRITON, reason="triton cannot run here")
def test_torch_compile_fullgraph(device):
    q, k, cos, sin, dq, dk = make_inputs(CONFIGS[0], torch.float32, device, False)

    def attention_prologue(q, k, cos, sin):
        q, k = gf.rope(q * 2, k, cos, sin, backend="triton")
        return torch.relu(q), k

    got = run(torch.compile(attention_prologue, fullgraph=True), q, k, cos, sin, dq, dk)
    want = run(lambda q, k, c, s: (torch.relu(rope_float64(q * 2, c, s, False)), rope_float64(k, c, s, False)),
               *(t.double() for t in (q, k, cos, sin, dq, dk)))
    for name, mine, ref in zip(("q", "k", "dq", "dk"), got, want, strict=True):
        assert_close_rel(mine, ref, REL_TOL[torch.float32], name)


def test_exported_from_package():
    assert gf.rope is gf.kernels.rope.rope and "rope" in gf.__all__


Q, K, T = torch.ones(2, 4, 5, 8), torch.ones(2, 2, 5, 8), torch.ones(5, 8)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(q=torch.ones(4, 5, 8)), ValueError, "q: expected a 4-D tensor"),
    (dict(k=torch.ones(2, 2, 6, 8)), ValueError, r"k: expected shape \(2, Hkv, 5, 8\)"),
    (dict(k=K.half()), TypeError, "k: expected dtype torch.float32"),
    (dict(q=Q.long()), TypeError, "q: expected dtype"),
    (dict(cos=torch.ones(4, 8)), ValueError, r"cos: expected shape \(5, R\), \(1, 5, R\) or \(2, 5, R\)"),
    (dict(sin=torch.ones(3, 5, 8)), ValueError, r"sin: expected shape"),
    (dict(sin=torch.ones(5, 6)), ValueError, r"sin: expected shape \(5, 8\) \(that of cos\)"),
    (dict(sin=T.half()), TypeError, "sin: expected dtype torch.float32 \\(that of cos\\)"),
    (dict(cos=torch.ones(5, 7), sin=torch.ones(5, 7)), ValueError, "cos: expected an even number of rotated dims"),
    (dict(cos=torch.ones(5, 10), sin=torch.ones(5, 10)), ValueError, r"in 2\.\.8"),
    (dict(cos=torch.ones(5, 8, device="meta")), ValueError, "cos: expected device cpu"),
    (dict(interleaved=1), TypeError, "interleaved: expected a bool"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(q=Q, k=K, cos=T, sin=T) | kwargs
    with pytest.raises(error, match=match):
        gf.rope(args.pop("q"), args.pop("k"), args.pop("cos"), args.pop("sin"), **args)


def test_benchmark_cases_compute_the_reference():
    from gpuforge.kernels._selfcheck import relative_error
    from gpuforge.profiling.bench_rope import bench_cases

    for case in bench_cases(torch.device("cpu"), quick=True):
        inputs = case.make_inputs()
        want = case.reference(*[t.double() for t in inputs])
        assert set(case.fns) >= set(BACKEND_PARAMS)
        for label, fn in case.fns.items():
            for g, w in zip(fn(*inputs), want, strict=True):
                assert relative_error(g, w) <= 1e-5, (case.shape, label)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("config", [(4, 32, 8, 2048, 128, 128, "BS"), (2, 16, 16, 1000, 96, 48, "S")])
def test_gpu_numerics(dtype, interleaved, config):
    inputs = make_inputs(config, dtype, torch.device("cuda"), interleaved)
    got = run(lambda *t: gf.rope(*t, interleaved=interleaved, backend="triton"), *inputs)
    assert_matches(got, inputs, interleaved)
