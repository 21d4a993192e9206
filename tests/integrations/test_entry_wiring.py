"""The rope, swiglu and fused_linear_cross_entropy entries, wired into real HF models (the torch backend of
each op): the patched models must give the unpatched models' loss and gradients."""

from __future__ import annotations

import pytest
import torch

from gpuforge.integrations.transformers import PATCHED, apply_gpuforge
from tests.integrations.hf_models import VOCAB, build, twin


# llama: the plain SwiGLU MLP; phi3: partial rotary and a fused gate_up_proj; gemma2: final-logit softcapping
# in the loss; qwen3_moe: experts gated through _apply_gate, and the router's auxiliary loss
@pytest.mark.parametrize("model_type, overrides", [("llama", {}), ("phi3", {}), ("gemma2", {}),
                                                   ("qwen3_moe", {"output_router_logits": True})])
def test_entries_give_the_unpatched_loss_and_gradients(model_type, overrides):
    ref = build(model_type, **overrides)
    ours = twin(ref)
    report = apply_gpuforge(ours, rope=True, fused_linear_cross_entropy=True, backend="torch",
                            swiglu=None if model_type == "gemma2" else True)
    assert report["rope"] == report["fused_linear_cross_entropy"] == PATCHED
    assert report["swiglu"] == (PATCHED if model_type != "gemma2" else "not patched: gemma2 has no SwiGLU MLP")
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :3] = -100
    want, got = ref(ids, labels=labels), ours(ids, labels=labels)
    assert got.logits is None  # the logits are never formed
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    if overrides:
        torch.testing.assert_close(got.aux_loss, want.aux_loss, rtol=1e-5, atol=1e-6)
    want.loss.backward()
    got.loss.backward()
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
    # without labels the forward is HF's, logits included
    torch.testing.assert_close(ours(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-6)


def test_rope_patch_stays_on_the_instance():
    ref = build("llama")
    ours = twin(ref)
    apply_gpuforge(ours, rope=True, backend="torch")
    assert "forward" in vars(ours.model.layers[0].self_attn)
    assert "forward" not in vars(ref.model.layers[0].self_attn)
