"""gf.flash_attention / gf.flash_attention_varlen against float64 math, plus the ops' torch.library contract.

On a CPU the Triton kernels run under the interpreter with 16×16 tiles, so the short odd lengths here (1, 17, 33,
65) still cross tile boundaries, skip whole tiles (causal, window) and mask tails. GPU-marked tests cover fp16 /
bf16 at sizes where the autotuned tiles and tensor cores are used."""

import math

import pytest
import torch
import torch.nn.functional as F

import gpuforge as gf
from gpuforge.kernels import backends
from gpuforge.kernels import flash_attention as fa
from gpuforge.kernels._selfcheck import outputs_and_grads
from tests.helpers import assert_close_rel, max_rel_error

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON = backends.is_available("triton")[0] and backends.runs_on("triton", DEVICE)
needs_triton = pytest.mark.skipif(not TRITON, reason="triton cannot run here (no GPU, interpreter off)")
# fp32 on a GPU goes through tf32 tensor cores in tl.dot; the interpreter computes fp32 exactly.
FP32_TOL = 5e-3 if DEVICE.type == "cuda" else 2e-5


def make(shape, dtype=torch.float32, device=DEVICE):
    return torch.randn(shape, device=device).to(dtype)


def reference_with_grads(q, k, v, dout, causal=False, window=None, scale=None):
    """float64 math through torch autograd (independent of the ops' hand-written backward formulas)."""
    left, right = fa._window(window, causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    out, _ = fa.attention_math(q64, k64, v64, scale or 1 / math.sqrt(q.shape[-1]), left, right)
    out.backward(dout.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


def run_with_grads(fn, q, k, v, dout):
    return outputs_and_grads(fn, (q, k, v), dout)


def test_reference_matches_sdpa_float64():
    q, k, v = make((2, 4, 9, 16), torch.float64), make((2, 2, 13, 16), torch.float64), make((2, 2, 13, 16),
                                                                                           torch.float64)
    mask = torch.ones(9, 13, dtype=torch.bool).tril(diagonal=13 - 9)  # bottom-right causal
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                              attn_mask=mask.to(DEVICE))
    out, lse = fa.attention_math(q, k, v, 0.25, -1, 0)
    torch.testing.assert_close(out, expected)
    scores = (q @ k.repeat_interleave(2, 1).mT * 0.25).masked_fill(~mask.to(DEVICE), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


# (B, Hq, Hkv, Sq, Sk, D, causal, window): 1, odd and Sq != Sk lengths, GQA 1/2/4 and MQA, every head dim.
CASES = [
    (1, 1, 1, 1, 3, 32, False, None),  # one query (Sk = 1 would make dq exactly 0)
    (1, 2, 2, 17, 17, 64, True, None),
    (2, 4, 2, 33, 65, 32, True, None),  # Sq < Sk: the last query sees every key
    (1, 4, 1, 65, 33, 96, True, None),  # Sq > Sk: the first 32 queries see no key -> zeros
    (1, 2, 2, 33, 17, 128, False, None),
    (1, 2, 1, 65, 65, 32, False, (8, 4)),  # sliding window skips tiles on both sides
    (1, 2, 2, 33, 40, 32, True, (5, -1)),  # causal local attention
    (1, 1, 1, 17, 17, 256, True, None),
]


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-Sq{}-Sk{}-D{}-c{}-w{}".format(*c))
def test_triton_matches_float64(case):
    b, hq, hkv, sq, sk, d, causal, window = case
    q, k, v, dout = make((b, hq, sq, d)), make((b, hkv, sk, d)), make((b, hkv, sk, d)), make((b, hq, sq, d))
    got = run_with_grads(lambda *t: gf.flash_attention(*t, causal=causal, window=window, backend="triton"),
                         q, k, v, dout)
    expected = reference_with_grads(q, k, v, dout, causal, window)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        assert g.shape == e.shape and g.dtype == q.dtype
        assert_close_rel(g, e, FP32_TOL, f"{name} {case}")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype):
    q, k, v, dout = make((1, 2, 33, 32), dtype), make((1, 1, 20, 32), dtype), make((1, 1, 20, 32), dtype), \
        make((1, 2, 33, 32), dtype)
    fn = lambda *t: gf.flash_attention(*t, causal=True, backend="triton")  # noqa: E731
    got = run_with_grads(fn, q, k, v, dout)
    expected = reference_with_grads(q, k, v, dout, causal=True)
    torch_same_precision = run_with_grads(lambda *t: gf.flash_attention(*t, causal=True, backend="torch"),
                                          q, k, v, dout)
    for name, g, e, t in zip(("out", "dq", "dk", "dv"), got, expected, torch_same_precision, strict=True):
        # flash-attention's rule: at most 2x the error of a same-precision torch implementation, plus slack
        limit = 2 * fa_error(t, e) + (2e-3 if dtype == torch.float16 else 1.6e-2)
        assert_close_rel(g, e, limit, f"{name} {dtype}")


def fa_error(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


@needs_triton
def test_non_contiguous_inputs():
    base = make((1, 17, 3, 32))  # (B, S, H, D) memory, viewed as (B, H, S, D)
    q = base.transpose(1, 2)
    k = make((1, 20, 2, 64))[..., :32].transpose(1, 2)  # head dim sliced: stride(-1) is 1, rows strided
    v = make((1, 2, 32, 20)).transpose(2, 3)  # stride(-1) != 1: made contiguous
    k = k[:, :1].expand(1, 1, 20, 32)
    v = v[:, :1]
    dout = make((1, 3, 17, 32))
    got = run_with_grads(lambda *t: gf.flash_attention(*t, backend="triton"), q, k, v, dout)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, reference_with_grads(q, k, v, dout), strict=True):
        assert_close_rel(g, e, FP32_TOL, name)


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence(causal):
    lens_q, lens_k = [1, 17, 33], [5, 17, 20]
    hq, hkv, d = 4, 2, 32
    cu_q = torch.tensor([0, 1, 18, 51], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 5, 22, 42], dtype=torch.int32, device=DEVICE)
    q, k, v = make((51, hq, d)), make((42, hkv, d)), make((42, hkv, d))
    dout = make((51, hq, d))
    window = (6, -1)
    got = run_with_grads(lambda *t: gf.flash_attention_varlen(*t, cu_q, cu_k, max(lens_q), max(lens_k),
                                                              causal=causal, window=window, backend="triton"),
                         q, k, v, dout)
    qs, ks = cu_q.tolist(), cu_k.tolist()
    for i in range(3):
        rq, rk = slice(qs[i], qs[i + 1]), slice(ks[i], ks[i + 1])
        dense = [t[r].transpose(0, 1)[None] for t, r in ((q, rq), (k, rk), (v, rk), (dout, rq))]
        expected = reference_with_grads(*dense, causal=causal, window=window)
        for name, full, e, r in zip(("out", "dq", "dk", "dv"), got, expected, (rq, rq, rk, rk), strict=True):
            assert_close_rel(full[r].transpose(0, 1)[None], e, FP32_TOL, f"{name} sequence {i}")


def test_varlen_torch_backend_matches_dense():
    q, k, v = make((2, 2, 7, 16)), make((2, 1, 9, 16)), make((2, 1, 9, 16))
    pack = lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])  # noqa: E731
    cu_q = torch.tensor([0, 7, 14], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 18], dtype=torch.int32, device=DEVICE)
    out = gf.flash_attention_varlen(pack(q), pack(k), pack(v), cu_q, cu_k, 7, 9, causal=True, backend="torch")
    torch.testing.assert_close(out, pack(gf.flash_attention(q, k, v, causal=True, backend="torch")))


@needs_triton
def test_deterministic_backward_is_bit_identical():
    q, k, v, dout = make((1, 4, 33, 32)), make((1, 2, 40, 32)), make((1, 2, 40, 32)), make((1, 4, 33, 32))
    fn = lambda *t: gf.flash_attention(*t, causal=True, deterministic=True, backend="triton")  # noqa: E731
    first, second = run_with_grads(fn, q, k, v, dout), run_with_grads(fn, q, k, v, dout)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    atomic = run_with_grads(lambda *t: gf.flash_attention(*t, causal=True, backend="triton"), q, k, v, dout)
    for a, b in zip(first, atomic, strict=True):
        assert_close_rel(a, b.double(), FP32_TOL)


@needs_triton
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lse_output_and_its_gradient(backend):
    q, k, v = make((1, 2, 17, 32)), make((1, 2, 17, 32)), make((1, 2, 17, 32))
    weights = make((1, 2, 17))

    def loss(q_, k_, v_, op_backend):
        out, lse = torch.ops.gpuforge.flash_attention(q_, k_, v_, 0.2, -1, 0, False, op_backend)
        return out.sum() + (lse * weights.to(lse.dtype)).sum(), lse

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    total, lse = loss(*leaves, backend)
    total.backward()
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    total64, lse64 = loss(*leaves64, "torch")
    total64.backward()
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 17)
    assert_close_rel(lse, lse64, FP32_TOL, "lse")
    for name, a, b in zip("qkv", leaves, leaves64, strict=True):
        assert_close_rel(a.grad, b.grad, FP32_TOL, f"d{name}")


def test_gradcheck_float64():
    q, k, v = (torch.randn(1, h, s, 8, dtype=torch.float64, requires_grad=True)
               for h, s in ((2, 5), (1, 7), (1, 7)))
    for left, right in ((-1, 0), (2, 1)):
        fn = lambda a, b, c: torch.ops.gpuforge.flash_attention(a, b, c, 0.3, left, right, False, "torch")  # noqa
        assert torch.autograd.gradcheck(fn, (q, k, v))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend):
    if backend == "triton" and not TRITON:
        pytest.skip("triton cannot run here")
    q, k, v = (make(shape).requires_grad_() for shape in ((1, 2, 17, 16), (1, 1, 20, 16), (1, 1, 20, 16)))
    torch.library.opcheck(torch.ops.gpuforge.flash_attention.default, (q, k, v, 0.25, -1, 0, True, backend))
    cu = torch.tensor([0, 5, 17], dtype=torch.int32, device=DEVICE)
    qv, kv, vv = (make((17, h, 16)).requires_grad_() for h in (2, 1, 1))
    torch.library.opcheck(torch.ops.gpuforge.flash_attention_varlen.default,
                          (qv, kv, vv, cu, cu, 12, 12, 0.25, -1, 0, True, backend))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph(backend):
    if backend == "triton" and not TRITON:
        pytest.skip("triton cannot run here")
    q, k, v = (make(shape).requires_grad_() for shape in ((1, 2, 17, 16), (1, 1, 17, 16), (1, 1, 17, 16)))
    compiled = torch.compile(lambda a, b, c: gf.flash_attention(a, b, c, causal=True, backend=backend) * 2,
                             fullgraph=True)
    dout = make((1, 2, 17, 16))
    got = run_with_grads(compiled, q, k, v, dout)
    expected = reference_with_grads(q, k, v, 2 * dout, causal=True)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        assert_close_rel(g, 2 * e if name == "out" else e, FP32_TOL, f"compiled {name}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_varlen_with_backward(backend):
    if backend == "triton" and not TRITON:
        pytest.skip("triton cannot run here")
    cu = torch.tensor([0, 5, 17], dtype=torch.int32, device=DEVICE)
    q, k, v = (make((17, h, 16)).requires_grad_() for h in (2, 1, 1))
    compiled = torch.compile(lambda a, b, c: gf.flash_attention_varlen(a, b, c, cu, cu, 12, 12, causal=True,
                                                                       backend=backend), fullgraph=True)
    out = compiled(q, k, v)
    out.sum().backward()
    for start, end in ((0, 5), (5, 17)):
        dense = [t.detach()[start:end].transpose(0, 1)[None] for t in (q, k, v)]
        ref_out, ref_dq, ref_dk, ref_dv = reference_with_grads(*dense, torch.ones_like(dense[0]), causal=True)
        for name, full, e in zip(("out", "dq", "dk", "dv"), (out, q.grad, k.grad, v.grad),
                                 (ref_out, ref_dq, ref_dk, ref_dv), strict=True):
            assert_close_rel(full.detach()[start:end].transpose(0, 1)[None], e, FP32_TOL, f"{name} {start}:{end}")


@needs_triton
def test_saved_memory_is_linear_in_sequence_length():
    """Everything autograd keeps is O(S·D) per head (q, k, v, out, lse), never an S×S matrix."""
    b, h, s, d = 1, 2, 65, 16
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    q, k, v = (make((b, h, s, d)).requires_grad_() for _ in range(3))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gf.flash_attention(q, k, v, causal=True, backend="triton")
    assert saved and all(math.prod(shape) <= b * h * s * d for shape in saved), saved
    assert all(shape[-2:] != (s, s) for shape in saved)
    out.sum().backward()


def test_auto_uses_torch_on_cpu_tensors():
    assert fa.BACKENDS.select("auto", torch.device("cpu")) == "torch"


ONES = torch.ones(1, 2, 4, 8)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        ((ONES[0], ONES, ONES), {}, ValueError, "q: expected a 4-D tensor"),
        (([[1.0]], ONES, ONES), {}, TypeError, "q: expected a torch.Tensor"),
        ((ONES, torch.ones(1, 2, 4, 16), torch.ones(1, 2, 4, 16)), {}, ValueError, "k: expected head dim D=8"),
        ((torch.ones(1, 3, 4, 8), ONES, ONES), {}, ValueError, "Hq=3 must be a multiple of .* Hkv=2"),
        ((ONES, torch.ones(2, 2, 4, 8), torch.ones(2, 2, 4, 8)), {}, ValueError, "k: expected batch 1"),
        ((ONES, ONES, torch.ones(1, 2, 5, 8)), {}, ValueError, r"v: expected shape \(1, 2, 4, 8\)"),
        ((ONES, ONES.half(), ONES), {}, TypeError, "k: expected dtype torch.float32"),
        ((ONES.int(), ONES.int(), ONES.int()), {}, TypeError, "q: expected dtype"),
        ((ONES, ONES, ONES.to("meta")), {}, ValueError, "v: expected device cpu"),
        ((torch.ones(1, 1, 2, 300),) * 3, {}, ValueError, "head dim D=300 unsupported"),
        ((ONES, ONES, ONES), {"window": (3,)}, ValueError, "window: expected None or"),
        ((ONES, ONES, ONES), {"window": (-2, 0)}, ValueError, "window: expected None or"),
        ((ONES, ONES, ONES), {"scale": float("nan")}, ValueError, "scale: expected a finite float"),
        ((ONES, ONES, ONES), {"deterministic": 1}, TypeError, "deterministic: expected a bool"),
    ],
)
def test_bad_input_names_the_argument(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        gf.flash_attention(*args, **kwargs)


@pytest.mark.parametrize(
    "cu_q, cu_k, max_q, match",
    [
        (torch.tensor([0, 4]), torch.tensor([0, 4], dtype=torch.int32), 4, "cu_seqlens_q: expected dtype int32"),
        (torch.tensor([0], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), 4, "cu_seqlens_q: expected"),
        (torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 2, 4], dtype=torch.int32), 4,
         "cu_seqlens_k: expected shape"),
        (torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32), -1, "max_seqlen_q"),
    ],
)
def test_varlen_bad_input(cu_q, cu_k, max_q, match):
    x = torch.ones(4, 2, 8)
    with pytest.raises((ValueError, TypeError), match=match):
        gf.flash_attention_varlen(x, x, x, cu_q, cu_k, max_q, 4)


def test_exported_from_package():
    assert {"flash_attention", "flash_attention_varlen"} <= set(gf.__all__)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 8, 2, 1000, 1000, 128, True), (1, 4, 4, 130, 1031, 64, True),
                                   (3, 8, 1, 257, 257, 256, False), (2, 8, 4, 1024, 1024, 96, False)])
def test_gpu_half_precision_vs_sdpa(dtype, shape):
    b, hq, hkv, sq, sk, d, causal = shape
    q, k, v, dout = (make(s, dtype) for s in ((b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, d), (b, hq, sq, d)))
    got = run_with_grads(lambda *t: gf.flash_attention(*t, causal=causal, backend="triton"), q, k, v, dout)
    expected = reference_with_grads(q, k, v, dout, causal)
    mask = torch.ones(sq, sk, dtype=torch.bool, device="cuda").tril(sk - sq) if causal else None
    sdpa = run_with_grads(lambda a, b_, c: F.scaled_dot_product_attention(
        a, b_.repeat_interleave(hq // hkv, 1), c.repeat_interleave(hq // hkv, 1), attn_mask=mask), q, k, v, dout)
    for name, g, e, s in zip(("out", "dq", "dk", "dv"), got, expected, sdpa, strict=True):
        assert_close_rel(g, e, 2 * fa_error(s, e) + 1e-3, f"{name} {dtype} {shape}")


def _rope_complex(t, start):
    """RoPE as a complex rotation of the pairs (x[2i], x[2i+1]): independent of gf.rope and its tables."""
    d = t.shape[-1]
    pos = torch.arange(start, start + t.shape[2], dtype=torch.float64)
    angles = pos[:, None] * 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    pairs = torch.view_as_complex(t.double().reshape(*t.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nn_attention_matches_math(backend):
    if backend == "triton" and not TRITON:
        pytest.skip("triton cannot run here")
    layer = gf.nn.Attention(32, n_heads=4, n_kv_heads=2, max_seq_len=64, backend=backend).to(DEVICE)
    x = make((2, 17, 32)).requires_grad_()
    out = layer(x, start_pos=3)
    out.sum().backward()
    x64 = x.detach().double().requires_grad_()
    w = {name: p.detach().double() for name, p in layer.named_parameters()}
    heads = lambda t, h: t.view(2, 17, h, 8).transpose(1, 2)  # noqa: E731
    q, k = _rope_complex(heads(x64 @ w["wq.weight"].T, 4), 3), _rope_complex(heads(x64 @ w["wk.weight"].T, 2), 3)
    attn, _ = fa.attention_math(q, k, heads(x64 @ w["wv.weight"].T, 2), 8 ** -0.5, -1, 0)
    expected = attn.transpose(1, 2).reshape(2, 17, 32) @ w["wo.weight"].T
    expected.sum().backward()
    assert_close_rel(out, expected, FP32_TOL, "forward")
    assert_close_rel(x.grad, x64.grad, FP32_TOL, "dx")
    assert set(layer.state_dict()) == {"wq.weight", "wk.weight", "wv.weight", "wo.weight"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")
def test_cuda_backend_explains_why_it_cannot_run():
    with pytest.raises(RuntimeError, match="backend='cuda' is unavailable"):
        gf.flash_attention(ONES, ONES, ONES, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-Sq{}-Sk{}-D{}-c{}-w{}".format(*c))
def test_gpu_cuda_forward(case, dtype):
    b, hq, hkv, sq, sk, d, causal, window = case
    q, k, v = make((b, hq, sq, d), dtype), make((b, hkv, sk, d), dtype), make((b, hkv, sk, d), dtype)
    out, lse = torch.ops.gpuforge.flash_attention(q, k, v, d ** -0.5, *fa._window(window, causal), False, "cuda")
    ref_out, ref_lse = fa.attention_math(q.double(), k.double(), v.double(), d ** -0.5, *fa._window(window, causal))
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert_close_rel(out, ref_out, tol, f"out {case}")
    assert_close_rel(lse, ref_lse, 1e-5, f"lse {case}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-Sq{}-Sk{}-D{}-c{}-w{}".format(*c))
def test_gpu_cuda_backward(case, dtype):
    """csrc/flash_attention_bwd.cu through the op (its forward is the CUDA C++ one too), vs float64 autograd."""
    b, hq, hkv, sq, sk, d, causal, window = case
    q, k, v, dout = (make(s, dtype) for s in ((b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, d), (b, hq, sq, d)))
    got = run_with_grads(lambda *t: gf.flash_attention(*t, causal=causal, window=window, backend="cuda"), q, k, v,
                         dout)
    expected = reference_with_grads(q, k, v, dout, causal, window)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
        assert_close_rel(g, e, tol, f"{name} {case} {dtype}")


def test_the_wgmma_forward_is_opt_in_and_takes_what_tma_can_load():
    """csrc/flash_attention_wgmma.cu runs only with GPUFORGE_CUDA_WGMMA=1 on compute capability 9.0 (the switch:
    tests/kernels/test_matmul.py), for fp16/bf16 at D 128 with TMA-ready strides and at least one key; its
    numbers are checked in the SIMT emulator (tests/csrc/test_flash_attention_wgmma_simt.py)."""
    from gpuforge.kernels.attention_problem import Problem
    from gpuforge.kernels.cuda.flash_attention import wgmma_fits

    def fits(q, k):
        return wgmma_fits(q, k, k, Problem.dense(q, k, 0.1, -1, -1))

    q = torch.randn(1, 2, 33, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 1, 45, 128, dtype=torch.bfloat16)
    assert fits(q, k)
    assert fits(torch.randn(1, 33, 2, 128, dtype=torch.float16).transpose(1, 2), k.half())  # strided heads
    assert not fits(q.float(), k.float())                                  # fp32
    assert not fits(q[..., :64], k[..., :64])                              # D 64
    assert not fits(q, k[:, :, :0])                                        # no key
    assert not fits(torch.randn(1, 2, 33, 132, dtype=torch.bfloat16)[..., :128], k)  # row stride 132: not x8


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_wgmma_forward(dtype, causal):
    """The sm_90a kernel on the GPU itself (compute capability 9.0 only), odd lengths and GQA, vs float64."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("csrc/flash_attention_wgmma.cu is sm_90a code: compute capability 9.0 only")
    from gpuforge.kernels.attention_problem import Problem
    from gpuforge.kernels.cuda import flash_attention as cuda_fa

    q, k, v = make((2, 8, 1000, 128), dtype), make((2, 2, 1037, 128), dtype), make((2, 2, 1037, 128), dtype)
    left, right = fa._window(None, causal)
    out, lse = cuda_fa.forward(q, k, v, Problem.dense(q, k, 128 ** -0.5, left, right), wgmma=True)
    ref_out, ref_lse = fa.attention_math(q.double(), k.double(), v.double(), 128 ** -0.5, left, right)
    torch_out, _ = fa.attention_math(q, k, v, 128 ** -0.5, left, right)
    assert max_rel_error(out, ref_out) <= 2 * max_rel_error(torch_out, ref_out) + 1e-6
    assert_close_rel(lse, ref_lse, 1e-5, "lse")


def test_cuda_backward_binding_checks_arguments():
    ext = pytest.importorskip("gpuforge._C", reason="the CUDA extension is not built here")
    args = dict(q=16, k=16, v=16, out=16, dout=16, lse=16, dlse=16, dq=16, dk=16, dv=16, delta=16, batch=1,
                heads_q=4, heads_kv=2, seqlen_q=3, seqlen_k=3, head_dim=32, window_left=-1, window_right=0,
                q_b=384, q_h=96, q_s=32, k_b=192, k_h=96, k_s=32, v_b=192, v_h=96, v_s=32, scale=0.2, dtype=0,
                stream=0)
    with pytest.raises(ValueError, match="must be a multiple of heads_kv"):
        ext.flash_attention_backward(**args | dict(heads_kv=3))
    with pytest.raises(ValueError, match="head_dim must be in 1..256"):
        ext.flash_attention_backward(**args | dict(head_dim=257))
    with pytest.raises(ValueError, match="window_left and window_right"):
        ext.flash_attention_backward(**args | dict(window_left=-2))
    with pytest.raises(ValueError, match="unknown dtype code"):
        ext.flash_attention_backward(**args | dict(dtype=5))


@pytest.mark.gpu
def test_gpu_varlen_bf16_long():
    lens = [1000, 1, 517, 2048]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    total = sum(lens)
    q, k, v, dout = (make((total, h, 128), torch.bfloat16) for h in (16, 4, 4, 16))
    got = run_with_grads(lambda *t: gf.flash_attention_varlen(*t, cu, cu, max(lens), max(lens), causal=True,
                                                              backend="triton"), q, k, v, dout)
    for i, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        dense = [t[start:end].transpose(0, 1)[None] for t in (q, k, v, dout)]
        expected = reference_with_grads(*dense, causal=True)
        for name, full, e in zip(("out", "dq", "dk", "dv"), got, expected, strict=True):
            assert_close_rel(full[start:end].transpose(0, 1)[None], e, 3e-2, f"{name} sequence {i}")


# The CUDA C++ tensor-core forward (flash_attention_fwd_mma_kernel): fp16/bf16, D 64 or 128, 16-byte aligned
# rows. Odd lengths cross the 64-row/64-key tiles; Sq > Sk causal leaves rows with no visible key.
MMA_CASES = [(1, 2, 2, 1, 1, 64, False, None), (2, 4, 4, 97, 97, 64, False, None),
             (2, 8, 2, 130, 257, 128, True, None), (1, 8, 1, 300, 45, 64, True, None),
             (1, 4, 2, 200, 333, 128, False, (50, 7)), (3, 16, 2, 1031, 1031, 128, True, None)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", MMA_CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-Sq{}-Sk{}-D{}-c{}-w{}".format(*c))
def test_gpu_cuda_tensor_core_forward(case, dtype):
    b, hq, hkv, sq, sk, d, causal, window = case
    q, k, v = make((b, hq, sq, d), dtype), make((b, hkv, sk, d), dtype), make((b, hkv, sk, d), dtype)
    args = (d ** -0.5, *fa._window(window, causal))
    out, lse = torch.ops.gpuforge.flash_attention(q, k, v, *args, False, "cuda")
    ref_out, ref_lse = fa.attention_math(q.double(), k.double(), v.double(), *args)
    assert_close_rel(out, ref_out, {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype], f"out {case}")
    assert_close_rel(lse, ref_lse, 1e-5, f"lse {case}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_cuda_misaligned_rows_fall_back_to_baseline(dtype):
    """Rows that are not 16-byte aligned (one element of offset) cannot use cp.async: the baseline runs."""
    q, k, v = (make((1, 4, 77, 129), dtype)[..., 1:] for _ in range(3))
    out, lse = torch.ops.gpuforge.flash_attention(q, k, v, 128 ** -0.5, -1, 0, False, "cuda")
    ref_out, ref_lse = fa.attention_math(q.double(), k.double(), v.double(), 128 ** -0.5, -1, 0)
    assert_close_rel(out, ref_out, {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype], "out")
    assert_close_rel(lse, ref_lse, 1e-5, "lse")


# --- varlen offsets: never read or leave rows outside the packed tensors -----------------------------------

ATTENTION_BACKENDS = ["torch"] + (["triton"] if TRITON else [])


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("cu_q, max_q, match", [
    ([0, 3, 9], 6, "cu_seqlens_q: expected the last offset to be the packed length 8, got 9"),  # past the end
    ([0, 5, 8], 6, None),  # the valid layout, for contrast
    ([0, 6, 3, 8], 6, "cu_seqlens_q: expected non-decreasing offsets, found a step of -3"),  # unsorted
    ([0, 3, 6], 6, "cu_seqlens_q: expected the last offset to be the packed length 8, got 6"),  # rows 6, 7 unowned
    ([1, 3, 8], 6, r"cu_seqlens_q: expected offsets starting at 0, got cu_seqlens_q\[0\] = 1"),
    ([0, 5, 8], 4, "max_seqlen_q: 4 is less than the longest sequence, 5 rows"),  # understated maximum
])
def test_varlen_offsets_are_checked(backend, cu_q, max_q, match):
    q, k = make((8, 2, 16)), make((8, 2, 16))
    cu_q = torch.tensor(cu_q, dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0] + [8] * (len(cu_q) - 1), dtype=torch.int32, device=DEVICE)
    call = lambda: gf.flash_attention_varlen(q, k, k, cu_q, cu_k, max_q, 8, backend=backend)  # noqa: E731
    if match is None:
        assert torch.isfinite(call()).all()
    else:
        with pytest.raises(ValueError, match=match):
            call()


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_varlen_strided_offsets(backend):
    """cu_seqlens views with a stride (every other element of a longer tensor) are read as the values they hold."""
    q, k, v = make((12, 2, 16)), make((10, 1, 16)), make((10, 1, 16))
    cu_q = torch.tensor([0, -7, 5, -7, 12], dtype=torch.int32, device=DEVICE)[::2]
    cu_k = torch.tensor([0, -7, 4, -7, 10], dtype=torch.int32, device=DEVICE)[::2]
    assert cu_q.stride() == (2,)
    got = gf.flash_attention_varlen(q, k, v, cu_q, cu_k, 7, 6, causal=True, backend=backend)
    want = gf.flash_attention_varlen(q, k, v, cu_q.contiguous(), cu_k.contiguous(), 7, 6, causal=True,
                                     backend="torch")
    assert_close_rel(got, want.double(), FP32_TOL)


# --- causal alignment: bottom-right (FlashAttention-2) and top-left (SDPA's is_causal) -----------------------

@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("sq, sk", [(5, 11), (11, 5), (7, 7)])
def test_top_left_causal_is_sdpa_is_causal(backend, sq, sk):
    """causal="top_left" equals SDPA's is_causal=True (query i sees keys 0..i), forward and backward, also
    when Sq != Sk, where it differs from causal=True."""
    q, k, v, dout = make((1, 2, sq, 16)), make((1, 2, sk, 16)), make((1, 2, sk, 16)), make((1, 2, sq, 16))
    got = run_with_grads(lambda *t: gf.flash_attention(*t, causal="top_left", backend=backend), q, k, v, dout)
    sdpa = lambda *t: torch.nn.functional.scaled_dot_product_attention(*t, is_causal=True)  # noqa: E731
    want = run_with_grads(sdpa, q.double(), k.double(), v.double(), dout.double())
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert_close_rel(g, w, FP32_TOL, name)
    bottom_right = gf.flash_attention(q, k, v, causal=True, backend=backend)
    assert torch.equal(bottom_right, got[0]) == (sq == sk)


def test_causal_alignment_names_are_checked():
    q = make((1, 1, 3, 8))
    with pytest.raises(ValueError, match="causal: expected a bool or one of"):
        gf.flash_attention(q, q, q, causal="upper_left")
    with pytest.raises(ValueError, match="window: is measured from the bottom-right diagonal"):
        gf.flash_attention(q, make((1, 1, 5, 8)), make((1, 1, 5, 8)), causal="top_left", window=(2, 0))
    cu = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="causal: flash_attention_varlen aligns each sequence bottom-right"):
        gf.flash_attention_varlen(q[0].transpose(0, 1), q[0].transpose(0, 1), q[0].transpose(0, 1), cu, cu, 3, 3,
                                  causal="top_left")


def test_torch_backend_gradients_with_large_logits_match_sdpa():
    """Logits of size ~90 in float32: the torch backend's gradients stay within 2x SDPA's own float32 error
    (recomputing P as exp(S − LSE) put them at 5-14x)."""
    g = torch.Generator().manual_seed(3)
    q, k, v, dout = (torch.randn(1, 2, 24, 32, generator=g) * s for s in (9.5, 9.5, 1.0, 1.0))
    ours = run_with_grads(lambda *t: gf.flash_attention(*t, backend="torch"), q, k, v, dout)
    sdpa32 = run_with_grads(torch.nn.functional.scaled_dot_product_attention, q, k, v, dout)
    exact = run_with_grads(torch.nn.functional.scaled_dot_product_attention, q.double(), k.double(), v.double(),
                           dout.double())
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(32)
    assert scores.abs().max() > 60
    for name, o, s, e in zip(("out", "dq", "dk", "dv"), ours, sdpa32, exact, strict=True):
        ours_err, sdpa_err = max_rel_error(o, e), max_rel_error(s, e)
        assert ours_err <= 2 * sdpa_err + 1e-7, f"{name}: {ours_err:.2e} vs SDPA {sdpa_err:.2e}"


@pytest.mark.parametrize("causal", [False, True])
def test_with_lse_and_backward_from_the_lse_float64(causal):
    """gf.flash_attention_with_lse returns (out, lse), both differentiable; gf.flash_attention_backward gives
    the gradients of (out, lse) from the saved LSE (ring attention's two building blocks), GQA, torch backend."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, h, 7, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    out, lse = gf.flash_attention_with_lse(q, k, v, causal=causal)
    ref_out, ref_lse = fa.attention_math(q, k, v, 8 ** -0.5, -1, 0 if causal else -1)
    assert_close_rel(out, ref_out, 1e-13)
    assert_close_rel(lse, ref_lse, 1e-13)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), (q, k, v))
    autograd = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    explicit = gf.flash_attention_backward(dout, q, k, v, out.detach(), lse.detach(), dlse=dlse, causal=causal)
    for a, b, w in zip(autograd, explicit, want, strict=True):
        assert_close_rel(a, w, 1e-12)
        assert_close_rel(b, w, 1e-12)
    with pytest.raises(ValueError, match="dout, out: expected shape"):
        gf.flash_attention_backward(dout[:, :, :3], q, k, v, out, lse)
