"""The pieces apply_gpuforge puts into HF models, one per patch entry, each calling one gpuforge op:

    rms_norm    gf.nn.RMSNorm in place of the model's RMSNorm (weight shared; Gemma's (1 + w) as weight_offset)
    layer_norm  gf.nn.LayerNorm in place of a LayerNorm (or, in a modelling module, its forward on gf.layer_norm)
    rope        `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)` in HF's signature, on gf.rope
    swiglu      MLP forwards (gate_proj/up_proj/down_proj, or Phi-3's fused gate_up_proj) and the MoE experts'
                `_apply_gate`, on gf.swiglu
    fused_linear_cross_entropy  a causal-LM forward that, given labels, computes the loss from the last hidden
                states and lm_head's weight by gf.fused_linear_cross_entropy (the logits are never formed)

"""

from __future__ import annotations

import inspect
import sys
import types

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast, MoeCausalLMOutputWithPast

import gpuforge
from gpuforge import nn as gfnn

# ------------------------------------------------------------------------------------------------ norms


def rms_norm_like(module: nn.Module, offset: float, backend: str) -> gfnn.RMSNorm:
    """A gf.nn.RMSNorm sharing `module`'s weight (HF norms keep eps as `variance_epsilon` or `eps`)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    norm = gfnn.RMSNorm(tuple(module.weight.shape), eps, device="meta", backend=backend, weight_offset=offset)
    norm.weight = module.weight
    return norm


def rms_norm_class(hf_class: type, offset: float, backend: str) -> type:
    """A gf.nn.RMSNorm subclass taking `hf_class`'s constructor arguments (`hidden_size` or `dim`, `eps`), so
    HF's modelling code builds it where it built `hf_class`. Its name keeps "RMSNorm": HF's weight
    initialisation finds norms by that."""
    signature = inspect.signature(hf_class.__init__)

    def __init__(self, *args, **kwargs):
        bound = signature.bind(None, *args, **kwargs)
        bound.apply_defaults()
        size, eps = list(bound.arguments.values())[1:3]
        gfnn.RMSNorm.__init__(self, size, eps, backend=backend, weight_offset=offset)

    return type(f"Gpuforge{hf_class.__name__}", (gfnn.RMSNorm,), {"__init__": __init__})


def layer_norm_like(module: nn.LayerNorm, backend: str) -> nn.Module:
    """gf.nn.LayerNorm sharing `module`'s weight and bias."""
    norm = gfnn.LayerNorm(module.normalized_shape, module.eps, module.elementwise_affine, device="meta",
                          backend=backend)
    norm.weight, norm.bias = module.weight, module.bias
    return norm


def layer_norm_forward(backend: str):
    """forward(x) of a LayerNorm class with weight, bias and eps (a modelling module's own class), on gf.layer_norm."""
    def forward(self, x):
        return gpuforge.layer_norm(x, self.weight, self.bias, self.eps, backend=backend)

    return forward


# ------------------------------------------------------------------------------------------------- rope


def rope_function(backend: str):
    """HF's `apply_rotary_pos_emb` on gf.rope: q (B, Hq, S, D), k (B, Hkv, S, D); cos/sin (B, S, R) as HF's
    rotary modules return them (rotate-half layout, R <= D: partial rotary)."""

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if unsqueeze_dim != 1:
            raise ValueError(f"unsqueeze_dim: gf.rope takes q/k as (B, H, S, D) (unsqueeze_dim=1), got {unsqueeze_dim}")
        return gpuforge.rope(q, k, cos, sin, backend=backend)

    return apply_rotary_pos_emb


def _module_copy(globals_: dict, name: str, value) -> dict:
    """The globals of a copy of the module that owns `globals_`, with `name` set to `value`, registered in
    sys.modules under its own name: torch.compile finds a function's globals through sys.modules[__name__],
    so a bare dict copy would be guarded (and traced) as HF's module."""
    label = getattr(value, "__qualname__", type(value).__name__).replace(".", "_").replace("<", "").replace(">", "")
    copy_name = f"{globals_['__name__']}__gpuforge_{name}_{label}_{id(value):x}"
    module = types.ModuleType(copy_name)
    module.__dict__.update({**globals_, "__name__": copy_name, name: value})
    sys.modules[copy_name] = module
    return module.__dict__


def _rebound(function, name: str, value):
    """`function` (unwrapped from its decorators) with the module-level `name` resolved to `value`: the same
    code and defaults, the globals of a module copy. How one instance's attention forward calls gf.rope while
    every other model of that type keeps HF's function."""
    inner = inspect.unwrap(function)
    if name not in inner.__code__.co_names:
        raise ValueError(f"{inner.__qualname__}: does not call {name}; its rope cannot be patched")
    rebound = types.FunctionType(inner.__code__, _module_copy(inner.__globals__, name, value), inner.__name__,
                                 inner.__defaults__, inner.__closure__)
    rebound.__kwdefaults__ = inner.__kwdefaults__
    rebound.__qualname__ = inner.__qualname__
    return rebound


def with_global(modules, name: str, value) -> None:
    """Make these instances' forwards resolve the global `name` to `value` (one rebound function per class)."""
    rebound = {}
    for module in modules:
        cls = type(module)
        if cls not in rebound:
            rebound[cls] = _rebound(cls.forward, name, value)
        module.forward = types.MethodType(rebound[cls], module)


# ----------------------------------------------------------------------------------------------- swiglu


def _is_silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def swiglu_mlp_forward(original, backend: str):
    """forward(x) = down_proj(swiglu(gate_proj(x), up_proj(x))); an MLP whose activation is not SiLU runs
    HF's `original` forward."""
    def forward(self, x):
        if not _is_silu(self.act_fn):
            return original(self, x)
        return self.down_proj(gpuforge.swiglu(self.gate_proj(x), self.up_proj(x), backend=backend))

    return forward


def fused_swiglu_mlp_forward(original, backend: str):
    """Phi-3's MLP: gate and up are the two halves of one gate_up_proj."""
    def forward(self, x):
        if not _is_silu(self.activation_fn):
            return original(self, x)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(gpuforge.swiglu(gate, up, backend=backend))

    return forward


def swiglu_gate(original, backend: str):
    """The MoE experts' `_apply_gate(gate_up)` (gate and up halves), which HF's grouped_mm and batched_mm
    expert paths call; experts whose activation is not SiLU run HF's `original`."""
    def _apply_gate(self, gate_up):
        if not _is_silu(self.act_fn):
            return original(self, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return gpuforge.swiglu(gate, up, backend=backend)

    return _apply_gate


# ----------------------------------------------------------------------------------- fused linear + loss


def causal_lm_forward(original, load_balancing_loss=None, backend: str = "auto"):
    """A CausalLM forward: without labels, HF's own (`original`); with labels, the decoder's last hidden
    states go to gf.fused_linear_cross_entropy with lm_head's weight, shifted as HF's ForCausalLMLoss does
    (ignore_index −100, mean, or sum / num_items_in_batch), logits softcapped by the config's
    final_logit_softcapping; the output has the loss and logits=None. `load_balancing_loss`: the MoE
    module's function, whose auxiliary loss is added as HF's MoE forwards add it."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if labels is None:
            return original(self, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache,
                            logits_to_keep=logits_to_keep, **kwargs)
        if load_balancing_loss is not None and kwargs.get("output_router_logits") is None:
            kwargs["output_router_logits"] = self.config.output_router_logits
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             cache=cache, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        hidden = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        elif not isinstance(logits_to_keep, int):
            hidden = hidden[:, logits_to_keep]
        ignore_index = kwargs.get("ignore_index", -100)
        shift_labels = kwargs.get("shift_labels")
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        num_items = kwargs.get("num_items_in_batch")
        loss = gpuforge.fused_linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), self.lm_head.weight, shift_labels.reshape(-1).to(hidden.device),
            bias=self.lm_head.bias, ignore_index=ignore_index,
            softcap=getattr(self.config, "final_logit_softcapping", None),
            reduction="mean" if num_items is None else "sum", backend=backend)
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        common = {"loss": loss, "logits": None, "cache": outputs.cache, "hidden_states": outputs.hidden_states,
                  "attentions": outputs.attentions}
        if load_balancing_loss is None:
            return CausalLMOutputWithPast(**common)
        aux_loss = None
        if kwargs["output_router_logits"]:
            aux_loss = load_balancing_loss(outputs.router_logits, self.num_experts, self.num_experts_per_tok,
                                           attention_mask)
            common["loss"] = loss + self.router_aux_loss_coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(aux_loss=aux_loss, router_logits=outputs.router_logits, **common)

    return forward
