"""gpuforge inside HuggingFace transformers models: `apply_gpuforge` patches a model, or the modelling module of a
model type, so that its norms, rotary embedding, MLP activation, attention and loss run on gpuforge ops, with
HF's state-dict names unchanged (save_pretrained / from_pretrained work as before).

    from gpuforge.integrations.transformers import apply_gpuforge
    model = AutoModelForCausalLM.from_config(config)
    apply_gpuforge(model)                   # this instance; attention becomes attn_implementation="gpuforge"
    apply_gpuforge(model_type="llama")      # or: models of that type built afterwards

`transformers` is an optional extra (`pip install gpuforge[hf]`); this module imports it, `gpuforge` does not.

One patch table: each supported model type (FAMILIES) names, in its modelling module, the classes each of the
six entries replaces; each entry (ENTRIES) needs some gpuforge ops and says how it patches an instance and a
modelling module. The entries and what they call are in hf_layers.py and hf_attention.py.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from gpuforge.integrations import hf_attention, hf_layers
from gpuforge.kernels.backends import BACKENDS

ENTRY_NAMES = ("rms_norm", "layer_norm", "rope", "swiglu", "attention", "fused_linear_cross_entropy")
PATCHED = "patched"


@dataclass(frozen=True)
class Family:
    """One model type: its modelling module and the class names there that the entries replace."""

    module: str
    causal_lm: str
    rms_norm: tuple[str, ...] = ()
    norm_offset: float = 0.0        # Gemma scales by (1 + w)
    layer_norm: tuple[str, ...] = ()  # LayerNorm classes with weight, bias, eps (none of the families yet)
    attention: tuple[str, ...] = ()  # they call the module's apply_rotary_pos_emb and the attention interface
    mlp: tuple[str, ...] = ()        # gate_proj / up_proj / down_proj with act_fn
    fused_mlp: tuple[str, ...] = ()  # Phi-3: gate_up_proj / down_proj with activation_fn
    experts: tuple[str, ...] = ()    # MoE experts with gate_up_proj, gated by _apply_gate
    moe_loss: str | None = None      # the module's load-balancing loss, added to the LM loss

    def modelling(self) -> types.ModuleType:
        return importlib.import_module(self.module)


def _models(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


FAMILIES = {
    "llama": Family(_models("llama"), "LlamaForCausalLM", ("LlamaRMSNorm",), attention=("LlamaAttention",),
                    mlp=("LlamaMLP",)),
    "mistral": Family(_models("mistral"), "MistralForCausalLM", ("MistralRMSNorm",),
                      attention=("MistralAttention",), mlp=("MistralMLP",)),
    "qwen2": Family(_models("qwen2"), "Qwen2ForCausalLM", ("Qwen2RMSNorm",), attention=("Qwen2Attention",),
                    mlp=("Qwen2MLP",)),
    "qwen3": Family(_models("qwen3"), "Qwen3ForCausalLM", ("Qwen3RMSNorm",), attention=("Qwen3Attention",),
                    mlp=("Qwen3MLP",)),
    # Gemma's MLPs are GeGLU (gelu_pytorch_tanh), not SwiGLU: no swiglu target
    "gemma2": Family(_models("gemma2"), "Gemma2ForCausalLM", ("Gemma2RMSNorm",), 1.0,
                     attention=("Gemma2Attention",)),
    "gemma3_text": Family(_models("gemma3"), "Gemma3ForCausalLM", ("Gemma3RMSNorm",), 1.0,
                          attention=("Gemma3Attention",)),
    "phi3": Family(_models("phi3"), "Phi3ForCausalLM", ("Phi3RMSNorm",), attention=("Phi3Attention",),
                   fused_mlp=("Phi3MLP",)),
    "mixtral": Family(_models("mixtral"), "MixtralForCausalLM", ("MixtralRMSNorm",),
                      attention=("MixtralAttention",), experts=("MixtralExperts",),
                      moe_loss="load_balancing_loss_func"),
    "qwen3_moe": Family(_models("qwen3_moe"), "Qwen3MoeForCausalLM", ("Qwen3MoeRMSNorm",),
                        attention=("Qwen3MoeAttention",), mlp=("Qwen3MoeMLP",), experts=("Qwen3MoeExperts",),
                        moe_loss="load_balancing_loss_func"),
}


# ---------------------------------------------------------------------------------------------- entries


@dataclass(frozen=True)
class Entry:
    """One patch: the family's classes it replaces (none: the entry does not apply
    to that model type, for the reason `absent`), why a given config refuses it, and the two ways to apply it:
    on an instance (model, family, backend) and on the modelling module (module, family, backend)."""

    targets: Callable[[Family], tuple[str, ...]]
    absent: str
    on_instance: Callable
    on_module: Callable
    refuses: Callable = lambda config: None


def _instances(model: nn.Module, modelling, names):
    classes = tuple(getattr(modelling, n) for n in names)
    return [m for m in model.modules() if type(m) in classes]


def _swap(model: nn.Module, modelling, names, build) -> None:
    classes = tuple(getattr(modelling, n) for n in names)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in classes:
                setattr(parent, name, build(child))


def _subclass(modelling, name: str, members: dict) -> None:
    original = getattr(modelling, name)
    setattr(modelling, name, type(f"Gpuforge{name}", (original,), members))


def _rms_norm_instance(model, family, backend):
    _swap(model, family.modelling(), family.rms_norm,
          lambda m: hf_layers.rms_norm_like(m, family.norm_offset, backend))


def _rms_norm_module(modelling, family, backend):
    for name in family.rms_norm:
        setattr(modelling, name, hf_layers.rms_norm_class(getattr(modelling, name), family.norm_offset, backend))


def _layer_norm_instance(model, family, backend):
    _swap(model, family.modelling(), family.layer_norm, lambda m: hf_layers.layer_norm_like(m, backend))


def _layer_norm_module(modelling, family, backend):
    for name in family.layer_norm:
        _subclass(modelling, name, {"forward": hf_layers.layer_norm_forward(backend)})


def _rope_instance(model, family, backend):
    hf_layers.with_global(_instances(model, family.modelling(), family.attention), "apply_rotary_pos_emb",
                          hf_layers.rope_function(backend))


def _rope_module(modelling, family, backend):
    modelling.apply_rotary_pos_emb = hf_layers.rope_function(backend)


_SWIGLU_KINDS = (("mlp", "forward", hf_layers.swiglu_mlp_forward),
                 ("fused_mlp", "forward", hf_layers.fused_swiglu_mlp_forward),
                 ("experts", "_apply_gate", hf_layers.swiglu_gate))


def _swiglu_instance(model, family, backend):
    modelling = family.modelling()
    for kind, method, build in _SWIGLU_KINDS:
        for module in _instances(model, modelling, getattr(family, kind)):
            setattr(module, method, types.MethodType(build(getattr(type(module), method), backend), module))


def _swiglu_module(modelling, family, backend):
    for kind, method, build in _SWIGLU_KINDS:
        for name in getattr(family, kind):
            _subclass(modelling, name, {method: build(getattr(getattr(modelling, name), method), backend)})


def _attention_instance(model, family, backend):
    hf_attention.register()
    model.set_attn_implementation(hf_attention.NAME)
    for module in _instances(model, family.modelling(), family.attention):
        module.gpuforge_backend = backend


def _attention_module(modelling, family, backend):
    hf_attention.register()
    for name in family.attention:
        _subclass(modelling, name, {"gpuforge_backend": backend})


def _attention_refuses(config) -> str | None:
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return (f"the config sets attn_logit_softcapping={config.attn_logit_softcapping}, which gf.flash_attention "
                "does not have (set it to None to patch attention)")
    if getattr(config, "attention_dropout", 0.0):
        return f"the config sets attention_dropout={config.attention_dropout}; gf.flash_attention has no dropout"
    if getattr(config, "use_bidirectional_attention", False):
        return "the config sets use_bidirectional_attention; gpuforge attention is causal"
    return None


def _loss_forward(family, original, backend):
    moe_loss = getattr(family.modelling(), family.moe_loss) if family.moe_loss else None
    return hf_layers.causal_lm_forward(original, moe_loss, backend)


def _loss_instance(model, family, backend):
    causal_lm = getattr(family.modelling(), family.causal_lm)
    if not isinstance(model, causal_lm):
        raise ValueError(f"fused_linear_cross_entropy: patches a {family.causal_lm} (it has the lm_head), got a "
                         f"{type(model).__name__}; pass fused_linear_cross_entropy=False")
    model.forward = types.MethodType(_loss_forward(family, type(model).forward, backend), model)


def _loss_module(modelling, family, backend):
    # the CausalLM is built by the caller, not by the modelling module, so its class forward is replaced: this
    # reaches models of that class built before the call too
    causal_lm = getattr(modelling, family.causal_lm)
    causal_lm.forward = _loss_forward(family, causal_lm.forward, backend)


ENTRIES = {
    "rms_norm": Entry(lambda f: f.rms_norm, "has no RMSNorm",
                      _rms_norm_instance, _rms_norm_module),
    "layer_norm": Entry(lambda f: f.layer_norm, "has no LayerNorm",
                        _layer_norm_instance, _layer_norm_module),
    "rope": Entry(lambda f: f.attention, "has no rotary attention", _rope_instance, _rope_module),
    "swiglu": Entry(lambda f: f.mlp + f.fused_mlp + f.experts, "has no SwiGLU MLP",
                    _swiglu_instance, _swiglu_module),
    "attention": Entry(lambda f: f.attention, "has no attention",
                       _attention_instance, _attention_module, _attention_refuses),
    "fused_linear_cross_entropy": Entry(lambda f: (f.causal_lm,),
                                        "has no causal LM head", _loss_instance, _loss_module),
}


# ------------------------------------------------------------------------------------------------ apply


def _check_options(flags: dict, backend) -> None:
    for name, value in flags.items():
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{name}: expected True, False or None, got {type(value).__name__}")
    if not isinstance(backend, str) or backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend: expected one of {('auto', *BACKENDS)}, got {backend!r}")


def _family_of(model_type) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type: gpuforge has no patches for {model_type!r}; supported model types: "
                         f"{sorted(FAMILIES)}")
    return FAMILIES[model_type]


def _plan(model_type: str, family: Family, flags: dict, config) -> dict[str, str]:
    """entry -> PATCHED, or why it is left as HF's; raises for an entry asked for (True) that cannot run."""
    report = {}
    for name, entry in ENTRIES.items():
        wanted = flags[name]
        if wanted is False:
            report[name] = "not patched: turned off"
            continue
        reason = None if entry.targets(family) else f"{model_type} {entry.absent}"
        if reason is None and config is not None:
            reason = entry.refuses(config)
        if reason is not None and wanted:
            raise ValueError(f"{name}: cannot patch {model_type}: {reason}")
        report[name] = PATCHED if reason is None else f"not patched: {reason}"
    return report


def apply_gpuforge(model: nn.Module | None = None, *, model_type: str | None = None, rms_norm: bool | None = None,
                   layer_norm: bool | None = None, rope: bool | None = None, swiglu: bool | None = None,
                   attention: bool | None = None, fused_linear_cross_entropy: bool | None = None,
                   backend: str = "auto") -> dict[str, str]:
    """Patch a transformers model (`model`, in place) or the modelling module of `model_type` (models built from it
    afterwards) to compute with gpuforge ops; returns {entry: "patched" or "not patched: <why>"}.

    Each entry flag is None (the default: patch when the model type has the layer and its config allows it;
    otherwise leave HF's layer and say why in the report), True (patch, or raise ValueError naming what is
    missing: a layer the model lacks, a config the op cannot compute) or False (leave HF's layer).

    rms_norm: the RMSNorm modules become gf.nn.RMSNorm sharing their weights (Gemma's (1 + w) included).
    layer_norm: torch LayerNorms become gf.nn.LayerNorm. rope: the attention layers' apply_rotary_pos_emb calls
    gf.rope (on an instance, that instance's forward only). swiglu: SiLU-gated MLPs and MoE experts call
    gf.swiglu. attention: "gpuforge" is registered in transformers' AttentionInterface and the model switched to
    it (on a modelling module: registered; build models with attn_implementation="gpuforge"); masks it cannot
    compute exactly raise (hf_attention.py), and attention-logit softcapping (Gemma 2's default) is refused,
    not approximated. fused_linear_cross_entropy: with labels, the forward returns the loss computed from the
    hidden states without forming the logits (logits=None). `backend` is passed to every op.

    A second application to the same model (or module) with the same options is a no-op returning the first
    report; with other options it raises ValueError, never patching twice. Unsupported model types raise
    ValueError listing the supported ones."""
    flags = {"rms_norm": rms_norm, "layer_norm": layer_norm, "rope": rope, "swiglu": swiglu,
             "attention": attention, "fused_linear_cross_entropy": fused_linear_cross_entropy}
    _check_options(flags, backend)
    if (model is None) == (model_type is None):
        raise ValueError("model, model_type: give exactly one (a model instance, or a model type to patch its "
                         "modelling module)")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a transformers model (nn.Module), got {type(model).__name__}")
    target_type = model_type if model is None else getattr(getattr(model, "config", None), "model_type", None)
    family = _family_of(target_type)
    modelling = family.modelling()
    options = (tuple(flags.items()), backend)
    holder = model if model is not None else modelling
    done = getattr(holder, "_gpuforge_applied", None)
    if done is not None:
        if done[0] != options:
            raise ValueError(f"model: already patched by apply_gpuforge with other options {done[0]}; patch a fresh "
                             f"model (or module) instead of patching twice")
        return dict(done[1])
    if model is not None and getattr(modelling, "_gpuforge_applied", None) is not None:
        raise ValueError(f"model: the {target_type} modelling module is already patched "
                         f"(apply_gpuforge(model_type={target_type!r})), so models built from it are too")
    report = _plan(target_type, family, flags, None if model is None else model.config)
    for name, status in report.items():
        if status == PATCHED:
            entry = ENTRIES[name]
            if model is not None:
                entry.on_instance(model, family, backend)
            else:
                entry.on_module(modelling, family, backend)
    holder._gpuforge_applied = (options, report)
    return dict(report)
