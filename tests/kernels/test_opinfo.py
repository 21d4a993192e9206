"""PyTorch's own OpInfo sample inputs (torch.testing._internal.common_methods_invocations.op_db) run against
the gpuforge ops that stand in for them: add -> gf.vector_add, matmul / mm / bmm / __rmatmul__ -> gf.matmul,
softmax -> gf.softmax, nn.functional.rms_norm -> gf.nn.RMSNorm, nn.functional.scaled_dot_product_attention ->
gf.flash_attention.

Every sample, in float32, float16, bfloat16 and float64, either matches torch's float64 result (forward, and
backward for a random cotangent) within flash-attention's rule — at most twice the error of torch's own
computation in that dtype, plus the dtype's rounding — or is rejected with a TypeError/ValueError whose message
names the argument that is unsupported. Nothing else passes: a crash, a NaN, a wrong answer, an error of
another type, or an error that names nothing.
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch

import gpuforge as gf
from tests.helpers import max_rel_error

common = pytest.importorskip("torch.testing._internal.common_methods_invocations")

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12}


def _attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
               backend):
    if attn_mask is not None:
        raise ValueError("attn_mask: gf.flash_attention takes no explicit mask (use causal or window)")
    if dropout_p:
        raise ValueError("dropout_p: gf.flash_attention has no dropout")
    # SDPA's is_causal is aligned top-left; gf's causal=True is FlashAttention-2's bottom-right
    return gf.flash_attention(q, k, v, causal="top_left" if is_causal else False, scale=scale, backend=backend)


def _rms_norm(x, normalized_shape, weight=None, eps=None, *, backend):
    layer = gf.nn.RMSNorm(normalized_shape, eps=eps, elementwise_affine=weight is not None, device=x.device,
                          dtype=x.dtype, backend=backend)
    return layer(x) if weight is None else torch.func.functional_call(layer, {"weight": weight}, (x,))


# OpInfo name -> (call in gf terms taking the sample's (input, *args, **kwargs) and a backend, the torch function)
OPS = {
    "add": (gf.vector_add, torch.add),
    "matmul": (gf.matmul, torch.matmul),
    "mm": (gf.matmul, torch.mm),
    "bmm": (gf.matmul, torch.bmm),
    "__rmatmul__": (lambda x, other, *, backend: gf.matmul(other, x, backend=backend), lambda x, other: other @ x),
    "softmax": (gf.softmax, torch.softmax),
    "nn.functional.rms_norm": (_rms_norm, torch.nn.functional.rms_norm),
    "nn.functional.scaled_dot_product_attention": (_attention, torch.nn.functional.scaled_dot_product_attention),
}
# the reference backend everywhere; the Triton kernels too where they run (the interpreter on a CPU)
BACKENDS_HERE = ["torch"] + (["triton"] if gf.backends.is_available("triton")[0] else [])


def _cases():
    cases = []
    for op in common.op_db:
        if op.name not in OPS:
            continue
        for dtype in DTYPES:
            if dtype not in op.supported_dtypes("cpu"):
                continue
            for i, sample in enumerate(op.sample_inputs("cpu", dtype, requires_grad=False)):
                cases.append(pytest.param(op.name, dtype, sample, id=f"{op.name}-{op.variant_test_name}-"
                                                                      f"{str(dtype)[6:]}-{i}"))
    return cases


CASES = _cases()


def _convert(value, dtype):
    return value.detach().to(dtype).requires_grad_(value.is_floating_point()) if isinstance(value, torch.Tensor) \
        else value


def _run(fn, sample, dtype):
    """(outputs, gradients of the floating inputs for a fixed cotangent) of fn on the sample cast to dtype."""
    x = _convert(sample.input, dtype)
    args = [_convert(a, dtype) for a in sample.args]
    kwargs = {k: _convert(v, dtype) for k, v in sample.kwargs.items()}
    out = fn(x, *args, **kwargs)
    leaves = [t for t in (x, *args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    if not out.requires_grad or not leaves or out.numel() == 0:
        return out.detach(), []
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, cotangent, allow_unused=True)
    return out.detach(), [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads, strict=True)]


NAMES_ARGUMENT = re.compile(r"^(?:\w+: |\w+\(\) got an unexpected keyword argument '\w+')")


def _factor(backend: str, dtype: torch.dtype) -> float:
    """flash-attention's 2x; 4x for Triton bf16 under the interpreter, whose fp32 -> bf16 casts truncate instead
    of rounding to nearest (twice the unit roundoff on each of the forward's and backward's stores). On a GPU
    the casts round and the 2x rule applies."""
    interpreted = backend == "triton" and not torch.cuda.is_available()
    return 4.0 if interpreted and dtype == torch.bfloat16 else 2.0


@pytest.mark.parametrize("backend", BACKENDS_HERE)
@pytest.mark.parametrize("name,dtype,sample", CASES)
def test_opinfo_sample_matches_torch_or_is_rejected_clearly(name, dtype, sample, backend):
    ours, theirs = OPS[name]
    try:
        got, got_grads = _run(functools.partial(ours, backend=backend), sample, dtype)
    except (TypeError, ValueError) as err:
        message = str(err)
        assert NAMES_ARGUMENT.search(message), f"an error that names no argument: {type(err).__name__}: {message}"
        return
    want, want_grads = _run(theirs, sample, torch.float64)
    same_dtype, same_dtype_grads = _run(theirs, sample, dtype)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert got.dtype == same_dtype.dtype, (got.dtype, same_dtype.dtype)
    pairs = [("output", got, same_dtype, want)]
    pairs += [(f"grad {i}", g, s, w) for i, (g, s, w) in enumerate(zip(got_grads, same_dtype_grads, want_grads,
                                                                        strict=True))]
    for what, g, s, w in pairs:
        assert not (torch.isnan(g) & ~torch.isnan(w)).any(), f"{what}: NaN where torch has a number"
        ours_err, torch_err = max_rel_error(g, w), max_rel_error(s, w)
        bound = _factor(backend, dtype) * (torch_err if math.isfinite(torch_err) else 0.0) + FLOOR[dtype]
        assert ours_err <= bound, f"{what}: error {ours_err:.2e} > 2 x torch's {torch_err:.2e} + {FLOOR[dtype]:.0e}"


def test_the_suite_covers_the_ops_and_dtypes():
    """The sample set is PyTorch's, not ours: it must be large and reach every op in every dtype."""
    seen = {(c.values[0], c.values[1]) for c in CASES}
    assert {name for name, _ in seen} == set(OPS)
    assert len(CASES) > 300
