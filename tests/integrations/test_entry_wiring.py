"""The rope, swiglu and fused_linear_cross_entropy entries, wired into real HF models. Until gpuforge has
gf.rope, gf.swiglu and gf.fused_linear_cross_entropy, plain-torch formulas written here with those ops'
signatures stand in for them (test oracles, never part of gpuforge); once an op exists, the real one runs.
The patched models must give the unpatched models' loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import gpuforge
from gpuforge.integrations.transformers import PATCHED, apply_gpuforge
from tests.integrations.hf_models import VOCAB, build, twin


def _rope(q, k, cos, sin, *, interleaved=False, backend="auto"):
    assert not interleaved
    cos, sin = (t.unsqueeze(1) if t.dim() == 3 else t for t in (cos, sin))
    r = cos.shape[-1]

    def rotate(x):
        x_rot, x_pass = x[..., :r], x[..., r:]
        half = torch.cat((-x_rot[..., r // 2:], x_rot[..., :r // 2]), dim=-1)
        return torch.cat((x_rot * cos + half * sin, x_pass), dim=-1)

    return rotate(q), rotate(k)


def _swiglu(gate, up, *, backend="auto"):
    return F.silu(gate) * up


def _fused_linear_cross_entropy(hidden, weight, target, bias=None, *, ignore_index=-100, label_smoothing=0.0,
                                z_loss=0.0, softcap=None, reduction="mean", chunk_size=None, backend="auto"):
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)


STAND_INS = {"rope": _rope, "swiglu": _swiglu, "fused_linear_cross_entropy": _fused_linear_cross_entropy}


@pytest.fixture
def new_ops(monkeypatch):
    for name, function in STAND_INS.items():
        if not hasattr(gpuforge, name):
            monkeypatch.setattr(gpuforge, name, function, raising=False)


# llama: the plain SwiGLU MLP; phi3: partial rotary and a fused gate_up_proj; gemma2: final-logit softcapping
# in the loss; qwen3_moe: experts gated through _apply_gate, and the router's auxiliary loss
@pytest.mark.parametrize("model_type, overrides", [("llama", {}), ("phi3", {}), ("gemma2", {}),
                                                   ("qwen3_moe", {"output_router_logits": True})])
def test_entries_give_the_unpatched_loss_and_gradients(new_ops, model_type, overrides):
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


def test_rope_patch_stays_on_the_instance(new_ops):
    ref = build("llama")
    ours = twin(ref)
    apply_gpuforge(ours, rope=True, backend="torch")
    assert "forward" in vars(ours.model.layers[0].self_attn)
    assert "forward" not in vars(ref.model.layers[0].self_attn)
