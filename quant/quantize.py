"""One-call quantization: a weight matrix (`quantize_int4`) or every nn.Linear of a model (`quantize_model`).

`quantize_model` runs the calibration batches through the float model once, with a forward hook on each
Linear recording its inputs, then swaps each Linear (except those named in `skip`) for an Int4Linear
quantized with those inputs. Every layer is calibrated on the float model's activations (not on the outputs
of already-quantized earlier layers, as the GPTQ paper's sequential variant does).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from gpuforge.quant.awq import quantize_awq
from gpuforge.quant.format import Int4Weight
from gpuforge.quant.gptq import quantize_gptq
from gpuforge.quant.rtn import quantize_rtn

METHODS = ("rtn", "gptq", "awq")


def quantize_int4(w: torch.Tensor, group_size: int = 128, method: str = "rtn",
                  calibration: torch.Tensor | None = None, symmetric: bool = True,
                  scale_dtype: torch.dtype = torch.float16) -> Int4Weight:
    """W (N, K) -> Int4Weight. group_size: 32, 64, 128, … dividing K, or -1 (per output channel).
    "gptq" and "awq" need `calibration`, the layer's input activations (..., K)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if method == "rtn":
        return quantize_rtn(w, group_size, symmetric, scale_dtype)
    if calibration is None:
        raise ValueError(f"calibration: method {method!r} needs the layer's input activations (..., K)")
    quantizer = quantize_gptq if method == "gptq" else quantize_awq
    return quantizer(w, calibration, group_size, symmetric, scale_dtype)


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
    from gpuforge.quant.linear import Int4Linear

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
