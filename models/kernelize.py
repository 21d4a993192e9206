"""gf.models.kernelize: swap a reference model's layers for gpuforge ops, in place.

The reference models route normalisation, attention and softmax through the small modules of
models/_layers.py and their dense layers through nn.Linear; kernelize replaces each with a module that keeps
the same parameters (so state dicts and optimizers still apply) and calls the gpuforge op:

    _layers.RMSNorm   -> gf.rms_norm            _layers.Softmax -> gf.softmax (mask applied as −inf first)
    _layers.Attention -> gf.flash_attention (no mask; GQA, causal, Sq ≠ Sk), else gf.softmax inside
    nn.Linear         -> gf.matmul (+ bias)

nn.LayerNorm has no gpuforge op yet and stays as it is; so do convolutions and the tied output head
(F.linear on the embedding). The gpuforge ops take float32/float16/bfloat16, not float64.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from gpuforge.models import _layers

SWAPPABLE = ("rms_norm", "softmax", "attention", "linear")


class KernelRMSNorm(nn.Module):
    def __init__(self, ref: _layers.RMSNorm, backend: str):
        super().__init__()
        self.weight, self.eps, self.backend = ref.weight, ref.eps, backend

    def forward(self, x):
        import gpuforge as gf

        return gf.rms_norm(x, self.weight, self.eps, backend=self.backend)


class KernelSoftmax(nn.Module):
    def __init__(self, ref: _layers.Softmax, backend: str):
        super().__init__()
        self.dim, self.backend = ref.dim, backend

    def forward(self, x, mask=None):
        import gpuforge as gf

        if mask is not None:
            x = x.masked_fill(~mask, float("-inf"))
        return torch.nan_to_num(gf.softmax(x, self.dim, backend=self.backend), nan=0.0)


class KernelAttention(nn.Module):
    def __init__(self, ref: _layers.Attention, backend: str):
        super().__init__()
        self.backend = backend
        self.softmax = KernelSoftmax(ref.softmax, backend)

    def forward(self, q, k, v, *, causal=False, mask=None, scale=None):
        import gpuforge as gf

        if mask is None:
            return gf.flash_attention(q, k, v, causal=causal, scale=scale, backend=self.backend)
        hq, hkv = q.shape[1], k.shape[1]
        k, v = k.repeat_interleave(hq // hkv, dim=1), v.repeat_interleave(hq // hkv, dim=1)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        keep = _layers.causal_mask(q.shape[2], k.shape[2], q.device) & mask if causal else mask
        return self.softmax((q @ k.transpose(-1, -2)) * scale, keep) @ v


class KernelLinear(nn.Module):
    """y = x Wᵀ + b through gf.matmul; parameters `weight`, `bias` as in nn.Linear."""

    def __init__(self, ref: nn.Linear, backend: str):
        super().__init__()
        self.in_features, self.out_features = ref.in_features, ref.out_features
        self.weight, self.bias, self.backend = ref.weight, ref.bias, backend

    def forward(self, x):
        import gpuforge as gf

        flat = x.reshape(-1, x.shape[-1])
        y = gf.matmul(flat, self.weight.T, backend=self.backend)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


_SWAPS = {
    "rms_norm": (_layers.RMSNorm, KernelRMSNorm),
    "softmax": (_layers.Softmax, KernelSoftmax),
    "attention": (_layers.Attention, KernelAttention),
    "linear": (nn.Linear, KernelLinear),
}


def kernelize(model: nn.Module, backend: str = "auto", ops=SWAPPABLE) -> nn.Module:
    """Replace, in place, every submodule with a gpuforge equivalent among `ops` (names in SWAPPABLE) by a
    module calling that op with `backend`, sharing the original parameters. Returns the model."""
    unknown = set(ops) - set(SWAPPABLE)
    if unknown:
        raise ValueError(f"ops must be among {SWAPPABLE}, got unknown {sorted(unknown)}")
    swaps = [_SWAPS[name] for name in ops]
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            for ref_type, kernel_type in swaps:
                if type(child) is ref_type:
                    setattr(module, name, kernel_type(child, backend))
                    break
    return model
