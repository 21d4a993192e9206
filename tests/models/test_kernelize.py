"""kernelize: models with gpuforge ops swapped in give the plain models' outputs and gradients (fp32; on a
CPU the Triton kernels run under the interpreter)."""

import copy

import pytest
import torch

import gpuforge as gf
from gpuforge.models import vol1_architectures as m1
from gpuforge.models import vol2_llm as llm
from gpuforge.models import vol3_generative as m3
from gpuforge.models.kernelize import KernelAttention, KernelLinear, KernelRMSNorm, KernelSoftmax
from tests.helpers import assert_close_rel

BACKEND = "triton"
TOL = 2e-4  # fp32 end to end through several layers; each op alone is checked at 1e-5 in tests/kernels


def _compare(model, run, tol=TOL):
    kernel_model = gf.models.kernelize(copy.deepcopy(model), backend=BACKEND)
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


def test_tiny_llama_forward_backward_and_cached_decode():
    torch.manual_seed(0)
    model = llm.TinyLlama(llm.TinyLlamaConfig(dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, max_seq_len=32))
    tokens = llm.make_batch(0, 2, 12)[0]
    kernel_model = _compare(model, lambda m: m(tokens))
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
    features, adjacency, _ = m1.make_graph_batch(0, 12)
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
    with pytest.raises(ValueError, match="ops must be among"):
        gf.models.kernelize(torch.nn.Linear(2, 2), ops=("layer_norm",))


REFERENCE_CASES = [(vol, name) for vol in ("vol0_math", "vol1_architectures", "vol2_llm", "vol3_generative",
                                           "vol4_multimodal", "vol5_rl")
                   for name in getattr(gf.models, vol).REFERENCE_MODELS]


@pytest.mark.parametrize("volume, name", REFERENCE_CASES)
def test_every_reference_model_kernelized_gives_the_same_loss_and_gradients(volume, name):
    """Each registered model, its layers swapped for gpuforge ops, on its own batch and loss (fp32)."""
    build, make_batch, loss_fn = getattr(gf.models, volume).REFERENCE_MODELS[name]
    torch.manual_seed(0)
    model = build()
    batch = make_batch(3, 2)
    kernel_model = _compare(model, lambda m: loss_fn(m, batch).reshape(1))
    assert any(isinstance(m, KernelLinear | KernelRMSNorm | KernelSoftmax | KernelAttention)
               for m in kernel_model.modules()), "kernelize swapped nothing"
