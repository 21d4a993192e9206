"""`quantize_(model, Int4WeightOnlyConfig(...), filter_fn=None)`: whole-model int4 weight-only quantization in
torchao's shape, on quantize_model.

Which Linears: those `filter_fn(module, fqn)` accepts (torchao's filter signature); by default every nn.Linear
except the output head (the module `get_output_embeddings()` returns, as HF models define it, else one named
`lm_head`) and any Linear whose weight is an embedding's (a tied head). Embeddings are not Linears and are
never quantized; neither are MoE experts kept as 3-D parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gpuforge.quant.model import quantize_model
from gpuforge.quant.quantize import METHODS


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """int4 weights, activations as they are (W4A16). group_size divides each layer's in_features (or -1: one
    group per output channel); method "rtn", "gptq" or "awq"; the last two need `calibration`, batches for the
    model (a tensor, a tuple of positional args, a dict of keyword args, or a list of them)."""

    group_size: int = 128
    method: str = "rtn"
    calibration: Any = None
    symmetric: bool = True
    scale_dtype: torch.dtype = torch.float16

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {METHODS}, got {self.method!r}")
        if self.method != "rtn" and self.calibration is None:
            raise ValueError(f"calibration: method {self.method!r} needs calibration batches for the model")


def _head_names(model: nn.Module) -> set[str]:
    """The output head and the Linears sharing an embedding's weight."""
    names = {"lm_head"}
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if module is head or (isinstance(module, nn.Linear) and id(module.weight) in embedding_weights):
            names.add(name)
    return names


def default_filter(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """Every nn.Linear but the output head (see the module docstring)."""
    heads = _head_names(model)
    return lambda module, fqn: isinstance(module, nn.Linear) and fqn not in heads


def quantize_(model: nn.Module, config: Int4WeightOnlyConfig,
              filter_fn: Callable[[nn.Module, str], bool] | None = None) -> nn.Module:
    """Swap, in place, the Linears that `filter_fn(module, fqn)` selects (default: `default_filter`) for
    Int4Linear quantized as `config` says; returns the model. Modules the filter selects must be nn.Linear."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(config, Int4WeightOnlyConfig):
        raise TypeError(f"config: expected an Int4WeightOnlyConfig, got {type(config).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"filter_fn: expected a callable (module, fqn) -> bool, got {type(filter_fn).__name__}")
    chosen = filter_fn or default_filter(model)
    selected = {fqn for fqn, module in model.named_modules() if fqn and chosen(module, fqn)}
    for fqn in sorted(selected):
        module = model.get_submodule(fqn)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"filter_fn: selected {fqn!r}, a {type(module).__name__}; only nn.Linear is quantized")
    skip = [fqn for fqn, module in model.named_modules() if isinstance(module, nn.Linear) and fqn not in selected]
    return quantize_model(model, config.method, config.calibration, config.group_size, skip, config.symmetric,
                          config.scale_dtype)
