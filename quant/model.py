"""Whole-model quantization: every nn.Linear of a model swapped for an Int4Linear (`quantize_model`).

`quantize_model` runs the calibration batches through the float model once, with a forward hook on each
Linear recording its inputs, then swaps each Linear (except those named in `skip`) for an Int4Linear
quantized with those inputs. Every layer is calibrated on the float model's activations (not on the outputs
of already-quantized earlier layers, as the GPTQ paper's sequential variant does).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gpuforge.quant.linear import Int4Linear
from gpuforge.quant.quantize import METHODS


def _run(model: nn.Module, batch) -> None:
    if isinstance(batch, dict):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def capture_linear_inputs(model: nn.Module, calibration, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """{name: inputs (rows, in_features)} of the named Linears over the calibration batches. `calibration` is
    one batch (a tensor, a tuple of positional args or a dict of keyword args) or a list of batches."""
    modules = dict(model.named_modules())
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}

    def hook(name):
        def record(module, args):
            seen[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        return record

    handles = [modules[name].register_forward_pre_hook(hook(name)) for name in seen]
    try:
        with torch.no_grad():
            for batch in (calibration if isinstance(calibration, list) else [calibration]):
                _run(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: torch.cat(xs) for name, xs in seen.items() if xs}


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


def quantize_model(model: nn.Module, method: str = "rtn", calibration=None, group_size: int = 128,
                   skip: Iterable[str] = (), symmetric: bool = True,
                   scale_dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace, in place, every nn.Linear of `model` (except those named in `skip`, or under a named module)
    by an Int4Linear; returns the model. Linears never reached by the calibration batches raise for
    "gptq"/"awq" (they have no activations to calibrate on)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    skip = tuple(skip)
    targets = [name for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not _skipped(name, skip)]
    inputs: dict[str, torch.Tensor] = {}
    if method != "rtn":
        if calibration is None:
            raise ValueError(f"calibration: method {method!r} needs calibration batches for the model")
        inputs = capture_linear_inputs(model, calibration, targets)
        missing = [name for name in targets if name not in inputs]
        if missing:
            raise ValueError(f"calibration: the batches never reached Linear layers {missing}; skip them")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, Int4Linear.from_linear(linear, group_size, method, inputs.get(name), symmetric,
                                                      scale_dtype))
    return model
