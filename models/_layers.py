"""Building blocks shared by the reference models, each a small module so `kernelize` can swap it.

Every model routes its normalisation, attention and softmax through these classes (and its dense layers
through `nn.Linear`), so `gf.kernelize` finds them by type and replaces them with gpuforge ops.
All of them work in float64 (the oracles are run in float64 by the parallel tests).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.kernels.rope import rope_angles, rotate_interleaved


@dataclass(frozen=True)
class ReferenceModel:
    """The uniform interface the parallel tests train through.

    build(): a fresh model (deterministic given torch's seed); make_batch(seed, batch_size): a tuple of
    tensors, each with the samples along dim 0, deterministic given the seed; loss_fn(model, batch): a scalar
    loss (floating inputs are cast to the model's dtype, so a float64 model trains in float64).

    Unless `coupled`, the loss is a mean over samples: the loss of a batch equals the mean of the losses of
    equal slices of it along dim 0, which is what data parallelism (each rank a slice, gradients averaged)
    needs. `coupled`: the samples interact in the loss (TinyCLIP's negatives), so plain data parallelism
    changes it; the embeddings must be gathered first. `inference_only`: the model is evaluated, not trained
    (int4 weights are frozen buffers); loss_fn still scores it. An entry unpacks as the triple
    (build, make_batch, loss_fn).
    """

    build: Callable[[], nn.Module]
    make_batch: Callable[[int, int], tuple[torch.Tensor, ...]]
    loss_fn: Callable[[nn.Module, tuple[torch.Tensor, ...]], torch.Tensor]
    coupled: bool = False
    inference_only: bool = False

    def __iter__(self):
        return iter((self.build, self.make_batch, self.loss_fn))


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def to_model_dtype(model: nn.Module, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Cast floating tensors to the model's parameter dtype; integer tensors pass through."""
    dtype = model_dtype(model)
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight over the last dim (state dict `weight`, as torch.nn.RMSNorm).

    The statistic is computed in at least float32, so fp16/bf16 inputs do not lose the mean of squares."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(work)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(work)).to(x.dtype)


class Softmax(nn.Module):
    """softmax over `dim`, with an optional boolean mask (True = keep); fully masked rows give zeros."""

    def __init__(self, dim: int = -1):
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return torch.softmax(x, dim=self.dim)
        x = x.masked_fill(~mask, float("-inf"))
        out = torch.softmax(x, dim=self.dim)
        return torch.nan_to_num(out, nan=0.0)


class Attention(nn.Module):
    """softmax(q kᵀ · scale + mask) v, the attention core every model calls.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) with Hq % Hkv == 0 (grouped-query attention: each key/value
    head serves Hq / Hkv query heads). `causal` aligns the last query with the last key (query i sits at
    absolute position Sk − Sq + i), which is what a KV-cache decode step needs. `mask`: optional boolean,
    broadcastable to (B, Hq, Sq, Sk), True = may attend. Same contract as gf.flash_attention (plus `mask`).
    """

    def __init__(self):
        super().__init__()
        self.softmax = Softmax(dim=-1)

    def forward(self, q, k, v, *, causal: bool = False, mask: torch.Tensor | None = None,
                scale: float | None = None):
        hq, hkv = q.shape[1], k.shape[1]
        if hq % hkv:
            raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
        if hq != hkv:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        scores = (q @ k.transpose(-1, -2)) * scale
        keep = causal_mask(q.shape[2], k.shape[2], q.device) if causal else None
        if mask is not None:
            keep = mask if keep is None else keep & mask
        return self.softmax(scores, keep) @ v


def causal_mask(sq: int, sk: int, device) -> torch.Tensor:
    """(Sq, Sk) boolean: query i (absolute position sk − sq + i) may attend keys j ≤ sk − sq + i."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    return j <= i


class RotaryEmbedding(nn.Module):
    """RoPE (gpuforge.kernels.rope): rotate each pair (x[2i], x[2i+1]) by angle pos · theta^(−2i/D); relative
    positions then enter q·k only through their difference. Tables are buffers (not parameters) built for
    `max_seq_len`."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        cos, sin = rope_angles(head_dim, max_seq_len, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """x: (B, H, S, D) at absolute positions start_pos .. start_pos + S − 1."""
        s = x.shape[2]
        if start_pos < 0 or start_pos + s > self.cos.shape[0]:
            raise ValueError(f"start_pos: positions {start_pos} .. {start_pos + s - 1} must lie in "
                             f"0 .. {self.cos.shape[0] - 1} (max_seq_len {self.cos.shape[0]})")
        return rotate_interleaved(x, self.cos[start_pos:start_pos + s], self.sin[start_pos:start_pos + s])


class SwiGLU(nn.Module):
    """w2(silu(w1 x) ⊙ w3 x): the gated feed-forward of Llama (w1 gate, w3 up, w2 down; no biases)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
