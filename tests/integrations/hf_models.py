"""Tiny random-weight HF models of every model type apply_gpuforge supports, built from configs (nothing
downloaded): hidden 32, 2 layers, vocab 128, GQA (4 query heads, 2 KV heads), head dim 8."""

from __future__ import annotations

import copy

import torch
import transformers

VOCAB = 128
COMMON = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "pad_token_id": 0, "bos_token_id": 1,
          "eos_token_id": 2, "max_position_embeddings": 64}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}

CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6,
                                              max_window_layers=1),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON),
    # attention-logit softcapping off: gf.flash_attention has none (the default config is refused, tested apart)
    "gemma2": lambda: transformers.Gemma2Config(**COMMON, sliding_window=5, attn_logit_softcapping=None,
                                                query_pre_attn_scalar=8),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(**COMMON, sliding_window=5, query_pre_attn_scalar=8),
    "phi3": lambda: transformers.Phi3Config(**{k: v for k, v in COMMON.items() if k != "head_dim"},
                                            partial_rotary_factor=0.5),
    "mixtral": lambda: transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**COMMON, **MOE, num_experts=4),
}


def build(model_type: str, seed: int = 0, dtype: torch.dtype = torch.float32, **config_overrides):
    config = CONFIGS[model_type]()
    for name, value in config_overrides.items():
        setattr(config, name, value)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).to(dtype)


def twin(model):
    """An independent copy, config included (set_attn_implementation writes to the config its layers share)."""
    return copy.deepcopy(model)
