"""gf.fused_linear_cross_entropy on every backend that runs here, loss and gradients, against lm_head followed by
F.cross_entropy with the same options in float64: ignore_index, label smoothing, z-loss, softcapping, bias,
reductions mean/sum/none, uneven chunks; that no (tokens × vocab) tensor is ever made and the peak memory it
saves; and the ops' torch.library contract."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import gpuforge as gf
from gpuforge.kernels import fused_linear_cross_entropy as flce
from gpuforge.kernels.fused_linear_cross_entropy import BACKENDS, fused_linear_cross_entropy_float64
from tests.helpers import assert_close_rel, max_rel_error

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BACKEND_PARAMS = BACKENDS.runnable(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
TRITON = "triton" in BACKEND_PARAMS

OPTIONS = {
    "mean": dict(),
    "sum+smoothing+bias": dict(reduction="sum", label_smoothing=0.1, bias=True),
    "none+z_loss": dict(reduction="none", z_loss=1e-2, chunk_size=5),
    "mean+softcap+ignore": dict(softcap=3.0, ignore_index=7, chunk_size=16),
    "all": dict(reduction="mean", label_smoothing=0.2, z_loss=1e-3, softcap=10.0, bias=True, chunk_size=3),
}


def make_inputs(n, h, v, dtype, device, options, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g)
    weight = 2 * torch.randn(v, h, generator=g) / h ** 0.5  # logits of a few units: softcap and smoothing matter
    bias = torch.randn(v, generator=g) if options.get("bias") else None
    target = torch.randint(0, v, (n,), generator=g)
    target[::3] = options.get("ignore_index", -100)
    grad = torch.randn(n, generator=g) if options.get("reduction") == "none" else torch.tensor(0.7)
    cast = lambda t: t.to(device=device, dtype=dtype) if t is not None else None  # noqa: E731
    return cast(hidden), cast(weight), cast(bias), target.to(device), grad.to(device)


def run(fn, hidden, weight, bias, target, grad):
    """(loss, d hidden, d weight[, d bias]) of fn(hidden, weight, target, bias), fresh leaves."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    loss = fn(leaves[0], leaves[1], target, leaves[2])
    return (loss.detach(), *torch.autograd.grad(loss, [t for t in leaves if t is not None], grad.to(loss.dtype)))


def op_options(options):
    return {k: o for k, o in options.items() if k != "bias"}


def unfused(options):
    """lm_head then F.cross_entropy in the inputs' own dtype (+ z-loss), as an HF model computes it."""
    def fn(hidden, weight, target, bias):
        logits = F.linear(hidden, weight, bias)
        softcap = options.get("softcap")
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        reduction = options.get("reduction", "mean")
        ignore_index = options.get("ignore_index", -100)
        loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=options.get("label_smoothing", 0.0))
        if options.get("z_loss"):
            valid = target != ignore_index
            z = torch.where(valid, options["z_loss"] * torch.logsumexp(logits, -1).square(), 0)
            loss = loss + {"none": z, "sum": z.sum(), "mean": z.sum() / valid.sum()}[reduction]
        return loss
    return fn


def assert_matches(got, inputs, options):
    """Loss and gradients against float64, within max(TOL, 2x the error of the unfused pair in the dtype)."""
    reference_options = {k: o for k, o in op_options(options).items() if k != "chunk_size"}
    want = run(lambda *t: fused_linear_cross_entropy_float64(*t[:3], t[3], **reference_options),
               *(t.double() if t is not None else None for t in inputs[:3]), *inputs[3:])
    same = run(unfused(options), *inputs)
    dtype = inputs[0].dtype
    names = ("loss", "d hidden", "d weight", "d bias")[:len(got)]
    for name, mine, ref, theirs in zip(names, got, want, same, strict=True):
        assert mine.shape == ref.shape, name
        assert mine.dtype == (torch.float32 if name == "loss" else dtype), name
        assert_close_rel(mine, ref, max(TOL[dtype], 2 * max_rel_error(theirs, ref)), name)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_matches_float64(backend, dtype, name, device):
    options = OPTIONS[name]
    inputs = make_inputs(37, 24, 130, dtype, device, options, seed=len(name))
    got = run(lambda h, w, t, b: gf.fused_linear_cross_entropy(h, w, t, b, backend=backend, **op_options(options)),
              *inputs)
    assert_matches(got, inputs, options)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_vocabulary_wider_than_a_kernel_block(backend, device):
    """V = 4500 > the 4096-lane chunk the rows stream in: the online max/sum carries across chunks, and the
    backward's vocabulary blocks (a chunk of 2 tokens -> 1800 columns) start inside a row."""
    options = dict(label_smoothing=0.1, chunk_size=2)
    inputs = make_inputs(5, 8, 4500, torch.float32, device, options)
    got = run(lambda h, w, t, b: gf.fused_linear_cross_entropy(h, w, t, b, backend=backend, **options), *inputs)
    assert_matches(got, inputs, options)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_only_the_gradients_needed_are_formed(backend, device):
    """A frozen lm_head (LoRA-style): no weight gradient is computed, and the hidden gradient is unchanged."""
    hidden, weight, _, target, _ = make_inputs(9, 8, 33, torch.float32, device, {})
    h = hidden.clone().requires_grad_()
    gf.fused_linear_cross_entropy(h, weight, target, backend=backend).backward()
    want = run(lambda *t: fused_linear_cross_entropy_float64(*t[:3]), hidden.double(), weight.double(), None,
               target, torch.tensor(1.0))
    assert weight.grad is None
    assert_close_rel(h.grad, want[1], TOL[torch.float32], "d hidden")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_every_token_ignored_gives_nan_and_zero_gradients_as_torch(backend, device):
    hidden, weight, _, _, _ = make_inputs(4, 8, 11, torch.float32, device, {})
    target = torch.full((4,), -100, device=device)
    loss, dh, dw = run(lambda h, w, t, b: gf.fused_linear_cross_entropy(h, w, t, backend=backend), hidden, weight,
                       None, target, torch.tensor(1.0))
    torch_loss, torch_dh, torch_dw = run(unfused({}), hidden, weight, None, target, torch.tensor(1.0))
    assert torch.isnan(loss) and torch.isnan(torch_loss)
    assert torch.equal(dh, torch_dh) and torch.equal(dw, torch_dw) and not dw.any()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_empty_batch(backend, device):
    hidden = torch.empty(0, 8, device=device, requires_grad=True)
    weight = torch.randn(11, 8, device=device, requires_grad=True)
    target = torch.empty(0, dtype=torch.int64, device=device)
    assert gf.fused_linear_cross_entropy(hidden, weight, target, reduction="none", backend=backend).shape == (0,)
    gf.fused_linear_cross_entropy(hidden, weight, target, reduction="sum", backend=backend).backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight)) and hidden.grad.shape == (0, 8)


class _LargestOutput(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tokens_by_vocabulary_tensor_is_made():
    """Every tensor the forward and backward drivers make (torch rows, so each step is an aten op) holds at most a
    chunk's logits or the weight's elements; the unfused pair makes N × V ones."""
    n, h, v, chunk = 64, 8, 500, 8
    hidden, weight, _, target, _ = make_inputs(n, h, v, torch.float32, torch.device("cpu"), {})
    options = (-100, 0.1, 1e-3, 5.0)
    with _LargestOutput() as forward:
        loss, lse = flce._forward_sweep(flce.REFERENCE, hidden, weight, target, None, options, chunk)
    with _LargestOutput() as backward:
        flce._backward_sweep(flce.REFERENCE, torch.ones(n), hidden, weight, target, None, lse, options, chunk,
                             (True, True, True))
    with _LargestOutput() as baseline:
        unfused({})(hidden.requires_grad_(), weight.requires_grad_(), target, None).backward()
    assert max(forward.largest, backward.largest) <= max(chunk * v, v * h) < n * v <= baseline.largest


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_peak_memory_is_a_fraction_of_the_unfused_pair(dtype):
    """The benchmark's meter (resident-set high-water mark, reset before the run) at a small size: 2048 tokens,
    vocab 8192, hidden 64 (the unfused logits are 64 MiB in fp32)."""
    from gpuforge.profiling.bench_fused_linear_cross_entropy import measure_in_this_process

    rows = [measure_in_this_process(variant, 2048, 64, 8192, dtype, torch.device("cpu"), "torch")
            for variant in ("unfused", "fused")]
    assert rows[1]["peak_above_start_mib"] <= rows[0]["peak_above_start_mib"] / 4
    # the unfused pair's bf16 loss is rounded to bf16 (spacing 1/16 near 10); the fused loss is fp32
    assert abs(rows[1]["loss"] - rows[0]["loss"]) <= (1e-5 if dtype == torch.float32 else 1e-2) * rows[0]["loss"]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_opcheck(backend, device):
    hidden, weight, bias, target, _ = make_inputs(7, 8, 19, torch.float32, device, {"bias": True})
    hg, wg, bg = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    ops = torch.ops.gpuforge
    forward = ops.fused_linear_cross_entropy.default
    torch.library.opcheck(forward, (hg, wg, target, bg, -100, 0.1, 1e-3, 4.0, 3, backend))
    torch.library.opcheck(forward, (hg, wg, target, None, -100, 0.0, 0.0, None, 7, backend))
    _, lse = ops.fused_linear_cross_entropy(hidden, weight, target, bias, -100, 0.0, 0.0, None, 3, backend)
    torch.library.opcheck(ops.fused_linear_cross_entropy_backward.default,
                          (torch.randn(7, device=device), hidden, weight, target, bias, lse, -100, 0.0, 0.0, None, 3,
                           True, False, True, backend))


def test_gradcheck_float64():
    hidden, weight, bias, target, _ = make_inputs(5, 3, 6, torch.float64, torch.device("cpu"), {"bias": True})
    leaves = [t.requires_grad_() for t in (hidden, weight, bias)]
    assert torch.autograd.gradcheck(
        lambda h, w, b: torch.ops.gpuforge.fused_linear_cross_entropy(h, w, target, b, -100, 0.1, 1e-2, 2.0, 2,
                                                                      "torch")[0], leaves)


@pytest.mark.skipif(not TRITON, reason="triton cannot run here")
def test_torch_compile_fullgraph(device):
    options = dict(label_smoothing=0.1, softcap=5.0, chunk_size=4)
    inputs = make_inputs(13, 8, 40, torch.float32, device, options)
    compiled = torch.compile(lambda h, w, t, b: gf.fused_linear_cross_entropy(h * 2, w, t, backend="triton",
                                                                              **options), fullgraph=True)
    got = run(compiled, *inputs)
    want = run(lambda h, w, t, b: fused_linear_cross_entropy_float64(h * 2, w, t, label_smoothing=0.1, softcap=5.0),
               *(t.double() if t is not None else None for t in inputs[:3]), *inputs[3:])
    for name, mine, ref in zip(("loss", "d hidden", "d weight"), got, want, strict=True):
        assert_close_rel(mine, ref, TOL[torch.float32], name)


def test_exported_from_package():
    assert gf.fused_linear_cross_entropy is flce.fused_linear_cross_entropy
    assert "fused_linear_cross_entropy" in gf.__all__


H, W, T = torch.ones(4, 3), torch.ones(5, 3), torch.zeros(4, dtype=torch.int64)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(hidden=torch.ones(2, 4, 3)), ValueError, "hidden: expected a 2-D tensor"),
    (dict(weight=torch.ones(5, 4)), ValueError, r"weight: expected shape \(V, 3\)"),
    (dict(weight=torch.ones(0, 3)), ValueError, "with V >= 1"),
    (dict(weight=W.half()), TypeError, "weight: expected dtype torch.float32"),
    (dict(target=T.int()), TypeError, "target: expected dtype int64"),
    (dict(target=torch.zeros(3, dtype=torch.int64)), ValueError, r"target: expected shape \(4,\)"),
    (dict(target=torch.tensor([0, 1, 5, -100])), ValueError, r"target: expected class indices in 0\.\.4 .* got 5"),
    (dict(target=torch.tensor([0, -1, 2, 3])), ValueError, "got -1 at position 1"),
    (dict(bias=torch.ones(4)), ValueError, r"bias: expected shape \(5,\)"),
    (dict(ignore_index=1.5), TypeError, "ignore_index: expected an int"),
    (dict(label_smoothing=1.5), ValueError, r"label_smoothing: expected a float in \[0, 1\]"),
    (dict(z_loss=-1.0), ValueError, "z_loss: expected a finite float >= 0"),
    (dict(z_loss=float("inf")), ValueError, "z_loss: expected a finite float >= 0"),
    (dict(softcap=0.0), ValueError, "softcap: expected None or a positive finite float"),
    (dict(reduction="avg"), ValueError, "reduction: expected one of"),
    (dict(chunk_size=0), ValueError, "chunk_size: expected None or an int >= 1"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    args = dict(hidden=H, weight=W, target=T) | kwargs
    with pytest.raises(error, match=match):
        gf.fused_linear_cross_entropy(args.pop("hidden"), args.pop("weight"), args.pop("target"), **args)


def test_benchmark_cases_compute_the_reference():
    from gpuforge.kernels._selfcheck import relative_error
    from gpuforge.profiling.bench_fused_linear_cross_entropy import bench_cases

    for case in bench_cases(torch.device("cpu"), quick=True):
        inputs = case.make_inputs()
        want = case.reference(*[t.double() if t.is_floating_point() else t for t in inputs])
        assert set(case.fns) >= set(BACKEND_PARAMS)
        for label, fn in case.fns.items():
            for g, w in zip(fn(*inputs), want, strict=True):
                assert relative_error(g, w) <= 1e-5, (case.shape, label)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", ["mean", "all"])
def test_gpu_numerics(dtype, name):
    options = OPTIONS[name]
    inputs = make_inputs(4096, 1024, 32000, dtype, torch.device("cuda"), options)
    got = run(lambda h, w, t, b: gf.fused_linear_cross_entropy(h, w, t, b, backend="triton",
                                                               **op_options(options) | {"chunk_size": None}), *inputs)
    assert_matches(got, inputs, options)


@pytest.mark.gpu
def test_gpu_peak_memory_at_vocab_128k():
    """The memory target on a GPU: 8K tokens, hidden 2048, vocab 128K, bf16, peak <= 1/4 of the unfused pair."""
    from gpuforge.profiling.bench_fused_linear_cross_entropy import MEMORY_TARGET, measure

    unfused_row, fused_row = measure(8192, 2048, 131072, "bfloat16", "cuda", "triton")
    assert fused_row["peak_above_start_mib"] <= MEMORY_TARGET * unfused_row["peak_above_start_mib"]
