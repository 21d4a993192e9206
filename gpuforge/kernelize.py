"""gf.kernelize: swap a reference model's layers for gf.nn modules running gpuforge ops, in place.

The reference models (gpuforge.models) route normalisation, attention and softmax through the small modules
of models/_layers.py and their dense layers through nn.Linear; kernelize replaces each by the gf.nn module
that computes the same thing, sharing its parameters (so state dicts and optimizers still apply):

    _layers.RMSNorm   -> gf.nn.RMSNorm (gf.rms_norm)      _layers.Softmax -> gf.nn.Softmax (mask as −inf)
    _layers.Attention -> gf.nn.ScaledDotProductAttention (gf.flash_attention; with a mask, gf.softmax inside)
    nn.LayerNorm      -> gf.nn.LayerNorm (gf.layer_norm)  nn.Linear       -> gf.nn.Linear (gf.matmul + bias)

Convolutions and the tied output head (F.linear on the embedding) stay as they are. The gpuforge ops take
float32/float16/bfloat16, not float64.
"""

from __future__ import annotations

from torch import nn

from gpuforge import nn as gfnn
from gpuforge.models import _layers


def _rms_norm(ref: _layers.RMSNorm, backend: str) -> gfnn.RMSNorm:
    module = gfnn.RMSNorm(ref.weight.shape[0], ref.eps, backend=backend)
    module.weight = ref.weight
    return module


def _layer_norm(ref: nn.LayerNorm, backend: str) -> gfnn.LayerNorm:
    module = gfnn.LayerNorm(ref.normalized_shape, ref.eps, ref.elementwise_affine, ref.bias is not None,
                            device="meta", backend=backend)
    module.weight, module.bias = ref.weight, ref.bias
    return module


def _linear(ref: nn.Linear, backend: str) -> gfnn.Linear:
    module = gfnn.Linear(ref.in_features, ref.out_features, ref.bias is not None, device="meta", backend=backend)
    module.weight, module.bias = ref.weight, ref.bias
    return module


# op name -> (reference module type, builder of the gf.nn module sharing its parameters)
SWAPS = {
    "rms_norm": (_layers.RMSNorm, _rms_norm),
    "layer_norm": (nn.LayerNorm, _layer_norm),
    "softmax": (_layers.Softmax, lambda ref, backend: gfnn.Softmax(ref.dim, backend=backend)),
    "attention": (_layers.Attention, lambda ref, backend: gfnn.ScaledDotProductAttention(backend=backend)),
    "linear": (nn.Linear, _linear),
}
SWAPPABLE = tuple(SWAPS)


def kernelize(model: nn.Module, backend: str = "auto", ops=SWAPPABLE) -> nn.Module:
    """Replace, in place, every submodule of a type named by `ops` (names in SWAPPABLE) with its gf.nn module
    calling gpuforge ops with `backend`, sharing the original parameters. Returns the model."""
    unknown = set(ops) - set(SWAPPABLE)
    if unknown:
        raise ValueError(f"ops: expected names among {SWAPPABLE}, got unknown {sorted(unknown)}")
    swaps = [SWAPS[name] for name in ops]
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            for ref_type, build in swaps:
                if type(child) is ref_type:
                    setattr(module, name, build(child, backend))
                    break
    return model
