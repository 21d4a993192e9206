"""kernelize: models with gpuforge ops swapped in (RMSNorm, LayerNorm, softmax, attention, linear layers) give the
plain models' outputs and gradients (fp32; on a CPU the Triton kernels run under the interpreter)."""

import copy

import pytest
import torch

import gpuforge as gf
from gpuforge.models import vol1_architectures as m1
from gpuforge.models import vol2_llm as llm
from gpuforge.models import vol3_generative as m3
from gpuforge.nn import Linear as KernelLinear
from gpuforge.nn import RMSNorm as KernelRMSNorm
from gpuforge.nn import ScaledDotProductAttention as KernelAttention
from gpuforge.nn import Softmax as KernelSoftmax
from tests.helpers import REL_TOL, assert_close_rel

BACKEND = "triton"
TOL = 2e-4  # fp32 end to end through several layers; each op alone is checked at 1e-5 in tests/kernels


def _compare(model, run, tol=TOL):
    kernel_model = gf.kernelize(copy.deepcopy(model), backend=BACKEND)
    out_ref, out = run(model), run(kernel_model)
    assert_close_rel(out, out_ref.detach(), tol, "output")
    out_ref.square().mean().backward()
    out.square().mean().backward()
    # a gradient that is zero in exact arithmetic (e.g. GAT's source-score weights, which a row softmax cancels)
    # is rounding noise in both models: scale each parameter's error by at least 1e-3 of the largest gradient
    largest = max(p.grad.abs().max() for p in model.parameters() if p.grad is not None)
    for (name, p_ref), p in zip(model.named_parameters(), kernel_model.parameters(), strict=True):
        if p_ref.grad is not None:
            scale = max(p_ref.grad.abs().max(), 1e-3 * largest)
            err = (p.grad - p_ref.grad).abs().max() / scale
            assert err <= tol, f"grad of {name}: error {err:.2e} (relative to {scale:.2e}) > {tol:.0e}"
    return kernel_model


def test_tiny_llama_kernelized_cached_decode_equals_plain_forward():
    """Prefill then single-token decode steps (Sq = 1 over a growing Sk) through the gpuforge ops; the
    registry test below checks the full-sequence forward and the gradients."""
    torch.manual_seed(0)
    model = llm.TinyLlama(llm.TinyLlamaConfig.small(max_seq_len=32))
    tokens = llm.make_batch(0, 2, 12)[0]
    kernel_model = gf.kernelize(copy.deepcopy(model), backend=BACKEND)
    kinds = {type(m) for m in kernel_model.modules()}
    assert {KernelRMSNorm, KernelAttention, KernelLinear} <= kinds and torch.nn.Linear not in kinds
    with torch.no_grad():
        cache = kernel_model.new_cache(2)
        steps = [kernel_model(tokens[:, :9], cache, 0)] + [kernel_model(tokens[:, t:t + 1], cache, t)
                                                             for t in range(9, 12)]
        assert_close_rel(torch.cat(steps, 1), model(tokens), TOL, "cached decode")


def test_convnext_rms_and_gat_masked_softmax():
    torch.manual_seed(0)
    images, _ = m1.make_image_batch(0, 2)
    _compare(m1.TinyConvNeXt(dim=16, depth=1, norm="rms"), lambda m: m(images))
    features, adjacency, _ = m1.make_graph_batch(0, 2, n_nodes=12)
    gat = _compare(m1.TinyGAT(), lambda m: m(features, adjacency))
    assert any(isinstance(m, KernelSoftmax) for m in gat.modules())


def test_dit_cross_attention():
    torch.manual_seed(0)
    model = m3.TinyDiT(dim=16, depth=1)
    for p in model.parameters():  # leave adaLN-Zero's identity start so the attention matters
        torch.nn.init.normal_(p, std=0.2)
    x0, text, t, eps = m3.make_dit_batch(0, 2)
    _compare(model, lambda m: m(m3.noisy(x0, t, eps), t, text))


def test_unknown_op_is_rejected():
    with pytest.raises(ValueError, match="ops: expected names among"):
        gf.kernelize(torch.nn.Linear(2, 2), ops=("conv2d",))


REGISTRY = gf.models.reference_models()


def _kernel_batch(ref):
    """One sample (the interpreter's cost grows with the rows it runs), two for a coupled loss (CLIP's loss of
    a single pair is identically zero)."""
    return ref.make_batch(3, 2 if ref.coupled else 1)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_reference_model_kernelized_gives_the_same_loss_and_gradients(name):
    """Each registered model, its layers swapped for gpuforge ops, on its own batch and loss (fp32); an
    inference-only model is compared on its loss alone (no gradients)."""
    ref = REGISTRY[name]
    torch.manual_seed(0)
    model = ref.build()
    batch = _kernel_batch(ref)
    if ref.inference_only:
        kernel_model = gf.kernelize(copy.deepcopy(model), backend=BACKEND)
        with torch.no_grad():
            assert_close_rel(ref.loss_fn(kernel_model, batch), ref.loss_fn(model, batch), TOL, "loss")
    else:
        kernel_model = _compare(model, lambda m: ref.loss_fn(m, batch).reshape(1))
    assert any(isinstance(m, KernelLinear | KernelRMSNorm | KernelSoftmax | KernelAttention)
               for m in kernel_model.modules()), "kernelize swapped nothing"
    assert not any(type(m) is torch.nn.LayerNorm for m in kernel_model.modules()), "a LayerNorm stayed torch"


# ----------------------------------------------------------------------------------------------- GPU, fp16/bf16

def _loss_and_grads(model, loss_fn, batch, with_grads):
    loss = loss_fn(model, batch)
    if not with_grads:
        return loss.detach().double(), []
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
    return loss.detach().double(), [g.double() for g in grads]


def _errors(loss, grads, ref_loss, ref_grads):
    """Relative error of the loss, and of each gradient (max |error| over the largest |reference gradient| of
    that parameter, floored at 1e-3 of the largest of all, as in _compare)."""
    errors = {"loss": (abs(loss - ref_loss) / abs(ref_loss)).item()}
    largest = max((g.abs().max().item() for g in ref_grads), default=0.0)
    for i, (g, ref) in enumerate(zip(grads, ref_grads, strict=True)):
        errors[f"grad {i}"] = ((g - ref).abs().max() / max(ref.abs().max().item(), 1e-3 * largest, 1e-30)).item()
    return errors


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_kernelized_half_precision_on_gpu_within_twice_the_torch_error(name, dtype):
    """On a GPU (Triton compiled, not interpreted) in fp16/bf16, against the same model in fp32: the
    kernelized model's loss and every gradient are off by at most 2 × what the plain PyTorch model in the same
    dtype is off by, plus REL_TOL[dtype] (fp16 2e-3, bf16 1.6e-2): flash-attention's rule for reductions,
    applied end to end. Inference-only models are compared on the loss alone."""
    ref = REGISTRY[name]
    torch.manual_seed(0)
    reference = ref.build().cuda()
    batch = tuple(t.cuda() for t in ref.make_batch(3, 4))
    plain = copy.deepcopy(reference).to(dtype)
    kernel_model = gf.kernelize(copy.deepcopy(plain), backend="triton")
    with_grads = not ref.inference_only
    with torch.set_grad_enabled(with_grads):
        ref_loss, ref_grads = _loss_and_grads(reference, ref.loss_fn, batch, with_grads)
        plain_errors = _errors(*_loss_and_grads(plain, ref.loss_fn, batch, with_grads), ref_loss, ref_grads)
        kernel_errors = _errors(*_loss_and_grads(kernel_model, ref.loss_fn, batch, with_grads), ref_loss, ref_grads)
    names = ["loss"] + [n for n, p in reference.named_parameters() if p.requires_grad and with_grads]
    for what, key in zip(names, kernel_errors, strict=True):
        bound = 2 * plain_errors[key] + REL_TOL[dtype]
        assert kernel_errors[key] <= bound, f"{what}: kernelized error {kernel_errors[key]:.2e} > {bound:.2e} " \
                                            f"(plain {dtype} error {plain_errors[key]:.2e})"
