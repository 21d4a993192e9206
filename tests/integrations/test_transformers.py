"""apply_gpuforge on tiny random-init HF models of every supported type, against the same model unpatched:
logits and gradients (fp32 within 1e-4 relative; bf16 within 2x HF's own bf16 error against fp32), padding,
packed sequences, greedy generate() with the KV cache, training curves, save/load, torch.compile, bad input.

CPU tensors: backend="torch" for the sweeps over model types, and backend="triton" (the interpreter) for every
model type's logits and gradients and for Mistral's generate()."""

from __future__ import annotations

import pytest
import torch
import transformers

import gpuforge
from gpuforge.integrations import hf_attention
from gpuforge.integrations.transformers import ENTRY_NAMES, FAMILIES, PATCHED, apply_gpuforge
from tests.integrations.hf_models import CONFIGS, VOCAB, build, twin

MODEL_TYPES = sorted(CONFIGS)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


def _ids(batch=2, length=12, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _patched(model_type, backend="torch", dtype=torch.float32, **flags):
    ref = build(model_type, dtype=dtype)
    ours = twin(ref)
    report = apply_gpuforge(ours, backend=backend, **flags)
    return ref, ours, report


def _loss_and_grads(model, ids, **kwargs):
    """The logits (a forward without labels) and every gradient of the loss (a forward with labels: the patched
    model's loss comes from gf.fused_linear_cross_entropy, its logits are None)."""
    model.zero_grad()
    model(ids, labels=ids, **kwargs).loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    with torch.no_grad():
        return model(ids, **kwargs).logits, grads


# ------------------------------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_logits_and_gradients_match_fp32(model_type):
    ref, ours, report = _patched(model_type)
    assert report["rms_norm"] == PATCHED and report["attention"] == PATCHED
    assert ours.config._attn_implementation == "gpuforge"
    assert any(isinstance(m, gpuforge.nn.RMSNorm) for m in ours.modules())
    ids = _ids()
    ref_logits, ref_grads = _loss_and_grads(ref, ids)
    logits, grads = _loss_and_grads(ours, ids)
    assert _relative(logits, ref_logits) < 1e-4
    assert grads.keys() == ref_grads.keys()
    for name, grad in grads.items():
        assert _relative(grad, ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_triton_backend_matches_fp32(model_type):
    """The Triton kernels (interpreter) in every supported model type, forward and backward."""
    ref, ours, _ = _patched(model_type, backend="triton")
    ids = _ids(batch=1, length=8)
    ref_logits, ref_grads = _loss_and_grads(ref, ids)
    logits, grads = _loss_and_grads(ours, ids)
    assert _relative(logits, ref_logits) < 1e-4
    for name, grad in grads.items():
        assert _relative(grad, ref_grads[name]) < 1e-4, name


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_bf16_error_within_twice_hf_bf16(model_type):
    fp32 = build(model_type)
    hf_bf16 = twin(fp32).to(torch.bfloat16)
    ours = twin(fp32).to(torch.bfloat16)
    apply_gpuforge(ours, backend="torch")
    ids = _ids()
    exact_logits, exact_grads = _loss_and_grads(fp32, ids)
    hf_logits, hf_grads = _loss_and_grads(hf_bf16, ids)
    logits, grads = _loss_and_grads(ours, ids)
    # a floor of one bf16 ulp keeps an exact HF result from demanding an exact one from us
    floor = 2 ** -8
    assert _relative(logits, exact_logits) <= 2 * max(_relative(hf_logits, exact_logits), floor)
    # all gradients as one vector: a MoE router's top-k may pick another expert for a token when bf16 rounding
    # differs, which moves that token's share between experts (a discontinuity of the model, not an op error)
    flat = {name: torch.cat([g[k].float().flatten() for k in sorted(g)]) for name, g in
            (("exact", exact_grads), ("hf", hf_grads), ("ours", grads))}
    assert _relative(flat["ours"], flat["exact"]) <= 2 * max(_relative(flat["hf"], flat["exact"]), floor)


# ------------------------------------------------------------------------------------- masks and packing


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_mask_becomes_varlen(model_type, side):
    ref, ours, _ = _patched(model_type, backend="triton")
    ids = _ids(length=10)
    mask = torch.ones_like(ids)
    if side == "left":
        mask[0, :4] = 0
    else:
        mask[0, 7:] = 0
    keep = mask.bool()
    want = ref(ids, attention_mask=mask).logits[keep]
    got = ours(ids, attention_mask=mask).logits[keep]
    assert _relative(got, want) < 1e-4


@pytest.mark.parametrize("model_type", ["llama", "mistral", "gemma3_text"])
def test_packed_sequences_attend_within_themselves(model_type):
    """One row holding sequences of 5 and 7 tokens, position_ids restarting at each: the logits are those of
    each sequence run alone (the sliding windows of Mistral and Gemma 3 are 5 tokens, shorter than the second)."""
    ref, ours, _ = _patched(model_type, backend="triton" if model_type == "llama" else "torch")
    ids = _ids(batch=1, length=12)
    positions = torch.cat([torch.arange(5), torch.arange(7)])[None]
    alone = torch.cat([ref(ids[:, :5]).logits, ref(ids[:, 5:]).logits], dim=1)
    packed = ours(ids, position_ids=positions, use_cache=False).logits
    assert _relative(packed, alone) < 1e-4
    # FlashAttention-style offsets instead of position_ids give the same
    cu = torch.tensor([0, 5, 12], dtype=torch.int32)
    by_offsets = ours(ids, position_ids=positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=7, max_length_k=7).logits
    assert _relative(by_offsets, alone) < 1e-4


def test_a_four_dimensional_mask_raises():
    _, ours, _ = _patched("llama")
    ids = _ids(batch=1, length=6)
    custom = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="attention_mask: gpuforge attention takes the mask HF builds"):
        ours(ids, attention_mask=custom)


def test_a_layout_the_kernels_cannot_compute_raises():
    """A padding hole inside a sliding-window sequence: HF's window counts positions, the packed form would
    count kept keys, so the scores would differ; the mask builder refuses it."""
    _, ours, _ = _patched("mistral")
    ids = _ids(batch=1, length=10)
    mask = torch.ones_like(ids)
    mask[0, 3] = 0
    with pytest.raises(ValueError, match="this mask layout cannot be computed"):
        ours(ids, attention_mask=mask)


def test_mask_layout_of_a_decode_step_is_dense():
    """The KV-cache decode step: one query after 9 cached keys, no padding, is one bottom-right causal call."""
    layout = hf_attention.gpuforge_mask(2, 1, 10, q_offset=9, config=CONFIGS["llama"]())
    assert layout.dense and layout.q_length == 1 and layout.kv_length == 10


# ------------------------------------------------------------------------------------------- generation


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_greedy_generate_gives_the_same_tokens(model_type):
    ref, ours, _ = _patched(model_type)
    ids = _ids(length=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as batched generation pads
    options = {"attention_mask": mask, "max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(ids, **options), ref.generate(ids, **options))


def test_greedy_generate_triton():
    ref, ours, _ = _patched("mistral", backend="triton")
    ids = _ids(batch=1, length=4)
    options = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(ours.generate(ids, **options), ref.generate(ids, **options))


# --------------------------------------------------------------------------------------------- training


def test_training_converges_like_the_unpatched_model():
    """32 AdamW steps on one repeated batch: the loss curves and the final parameters agree."""
    ref, ours, _ = _patched("llama", backend="torch")
    curves = []
    for model in (ref, ours):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = _ids(batch=4, length=16, seed=7)
        losses = []
        for _ in range(32):
            opt.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(torch.tensor(losses))
    assert curves[1][-1] < 0.5 * curves[1][0]  # it learns
    torch.testing.assert_close(curves[1], curves[0], rtol=1e-4, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4, msg=name)


def test_save_and_load_round_trip(tmp_path):
    ref, ours, _ = _patched("qwen3")
    assert ours.state_dict().keys() == ref.state_dict().keys()
    ours.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    apply_gpuforge(loaded, backend="torch")
    ids = _ids()
    torch.testing.assert_close(loaded(ids).logits, ours(ids).logits, rtol=0, atol=0)
    torch.testing.assert_close(loaded(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-5)


def test_runs_under_torch_compile():
    """Inductor, forward and backward; one layer to keep compile time small. The mask builder runs eagerly
    (a graph break: its sizes depend on the mask's data)."""
    ref = build("llama", num_hidden_layers=1)
    ours = twin(ref)
    apply_gpuforge(ours, backend="torch")
    ids = _ids(length=8)
    compiled = torch.compile(ours)
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert _relative(loss, ref(ids, labels=ids).loss) < 1e-5
    assert _relative(compiled(ids).logits, ref(ids).logits) < 1e-4


# ------------------------------------------------------------------------------------ the patch table


def test_second_application_is_a_no_op_and_other_options_raise():
    _, ours, report = _patched("llama")
    norms = [m for m in ours.modules() if isinstance(m, gpuforge.nn.RMSNorm)]
    assert apply_gpuforge(ours, backend="torch") == report
    assert [m for m in ours.modules() if isinstance(m, gpuforge.nn.RMSNorm)] == norms
    with pytest.raises(ValueError, match="already patched"):
        apply_gpuforge(ours, backend="triton")


def test_unsupported_model_type_lists_the_supported_ones():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(ValueError, match=r"no patches for 'gpt2'; supported model types: \[.*'llama'.*\]"):
        apply_gpuforge(gpt2)
    with pytest.raises(ValueError, match="supported model types"):
        apply_gpuforge(model_type="bert")


def test_bad_arguments():
    model = build("llama")
    with pytest.raises(TypeError, match="rms_norm: expected True, False or None"):
        apply_gpuforge(model, rms_norm="yes")
    with pytest.raises(ValueError, match="backend: expected one of"):
        apply_gpuforge(model, backend="tpu")
    with pytest.raises(ValueError, match="give exactly one"):
        apply_gpuforge(model, model_type="llama")
    with pytest.raises(TypeError, match="model: expected a transformers model"):
        apply_gpuforge("llama")


def test_a_dtype_the_ops_lack_raises():
    _, ours, _ = _patched("llama")
    with pytest.raises(TypeError, match="expected dtype float32/float16/bfloat16, got float64"):
        ours.double()(_ids())


def test_gemma2_softcapping_is_refused_not_approximated():
    model = build("gemma2", attn_logit_softcapping=50.0)
    report = apply_gpuforge(twin(model), backend="torch")
    assert report["attention"].startswith("not patched: the config sets attn_logit_softcapping=50.0")
    with pytest.raises(ValueError, match="attention: cannot patch gemma2: the config sets attn_logit_softcapping"):
        apply_gpuforge(twin(model), attention=True)
    # chosen by hand, the registered implementation raises at the call
    hf_attention.register()
    model.set_attn_implementation("gpuforge")
    with pytest.raises(ValueError, match="softcap: gf.flash_attention has no attention-logit softcapping"):
        model(_ids())


def test_every_entry_is_in_the_table():
    assert set(ENTRY_NAMES) == {"rms_norm", "layer_norm", "rope", "swiglu", "attention",
                                "fused_linear_cross_entropy"}
    report = apply_gpuforge(build("gemma2"), rms_norm=False, backend="torch")
    assert report["rms_norm"] == "not patched: turned off"
    assert report["swiglu"] == "not patched: gemma2 has no SwiGLU MLP"


def test_patching_the_modelling_module_reaches_models_built_afterwards(monkeypatch):
    modelling = FAMILIES["llama"].modelling()
    for name in ("LlamaRMSNorm", "LlamaAttention", "LlamaMLP", "apply_rotary_pos_emb"):
        monkeypatch.setattr(modelling, name, getattr(modelling, name))  # restored after the test
    monkeypatch.setattr(modelling.LlamaForCausalLM, "forward", modelling.LlamaForCausalLM.forward)
    monkeypatch.setattr(modelling, "_gpuforge_applied", None, raising=False)
    ref = build("llama")
    report = apply_gpuforge(model_type="llama", backend="torch")
    assert report["rms_norm"] == PATCHED and apply_gpuforge(model_type="llama", backend="torch") == report
    ours = build("llama")
    ours.set_attn_implementation("gpuforge")
    ours.load_state_dict(ref.state_dict())
    assert any(isinstance(m, gpuforge.nn.RMSNorm) for m in ours.modules())
    assert not any(isinstance(m, gpuforge.nn.RMSNorm) for m in ref.modules())
    ids = _ids()
    assert _relative(ours(ids).logits, ref(ids).logits) < 1e-4
    with pytest.raises(ValueError, match="modelling module is already patched"):
        apply_gpuforge(build("llama"))
