"""gf.quant.quantize_ in torchao's shape on HF models (tiny random-init Llama, tied and untied heads):
which Linears become Int4Linear, the filter function, each method, and bad input."""

import os

import pytest
import torch
from torch import nn

from gpuforge.quant import Int4Linear, Int4WeightOnlyConfig, quantize_

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tests.integrations.hf_models import build, twin  # noqa: E402

BODY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _ids(seed=0):
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_quantizes_the_body_and_keeps_the_head_and_embeddings(method):
    model = build("llama")
    ref = twin(model)
    calibration = None if method == "rtn" else [{"input_ids": _ids(seed)} for seed in range(2)]
    quantize_(model, Int4WeightOnlyConfig(group_size=32, method=method, calibration=calibration))
    int4 = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert int4 == set(BODY)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight)
    with torch.no_grad():
        got, want = model(_ids(5)).logits, ref(_ids(5)).logits
    error = ((got - want).norm() / want.norm()).item()
    assert error < 0.2, error  # int4 with 32-wide groups on random weights


def test_a_tied_head_is_skipped():
    model = build("llama", tie_word_embeddings=True)
    model.tie_weights()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    quantize_(model, Int4WeightOnlyConfig(group_size=32))
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.model.embed_tokens.weight


def test_filter_fn_picks_the_layers():
    model = build("llama")
    quantize_(model, Int4WeightOnlyConfig(group_size=-1),
              filter_fn=lambda module, fqn: isinstance(module, nn.Linear) and fqn.endswith("q_proj"))
    int4 = [name for name, m in model.named_modules() if isinstance(m, Int4Linear)]
    assert int4 == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_bad_input():
    model = build("llama")
    with pytest.raises(ValueError, match="method: expected one of"):
        Int4WeightOnlyConfig(method="nf4")
    with pytest.raises(ValueError, match="calibration: method 'gptq' needs"):
        Int4WeightOnlyConfig(method="gptq")
    with pytest.raises(TypeError, match="config: expected an Int4WeightOnlyConfig"):
        quantize_(model, {"group_size": 32})
    with pytest.raises(ValueError, match="filter_fn: selected 'model.embed_tokens', a Embedding"):
        quantize_(model, Int4WeightOnlyConfig(group_size=32), filter_fn=lambda m, fqn: fqn == "model.embed_tokens")
    with pytest.raises(ValueError, match="group_size: expected a divisor of K=32"):
        quantize_(model, Int4WeightOnlyConfig(group_size=128))
