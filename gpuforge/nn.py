"""Drop-in torch.nn modules running gpuforge ops: the same constructor arguments and state-dict names as the
torch module each one replaces, so `load_state_dict` works across the two. `gf.kernelize` builds on them.

    RMSNorm  ↔ torch.nn.RMSNorm        LayerNorm ↔ torch.nn.LayerNorm    Linear ↔ torch.nn.Linear
    Softmax  ↔ torch.nn.Softmax (+ mask)
    ScaledDotProductAttention ↔ F.scaled_dot_product_attention (GQA, bottom-right causal, boolean mask)
    Attention: QKV projections + gf.rope + GQA on gf.flash_attention (the reference models' GQAttention layout)
"""

from __future__ import annotations

import math

import torch

from gpuforge.kernels._tensors import compute_dtype
from gpuforge.kernels.flash_attention import flash_attention, visibility_mask
from gpuforge.kernels.layer_norm import layer_norm
from gpuforge.kernels.matmul import matmul
from gpuforge.kernels.rms_norm import rms_norm
from gpuforge.kernels.rope import full_tables, rope, rope_angles
from gpuforge.kernels.softmax import softmax


class RMSNorm(torch.nn.Module):
    """torch.nn.RMSNorm computed by gf.rms_norm (statistics in fp32, one fused kernel each way).

    normalized_shape may span several trailing dims: they are flattened into one, whose RMS is the same.
    eps=None means the epsilon of the compute type (float32 for float16/bfloat16 inputs), as in torch. The
    output has x's dtype (the weight is cast to it); `backend` (keyword only, not in torch's signature) picks
    the gf backend. `weight_offset` (keyword only) scales by weight_offset + weight instead of weight: Gemma
    stores its norm weights as w − 1 (weight_offset=1.0, initialised to 0 so the scale starts at 1)."""

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float | None = None,
                 elementwise_affine: bool = True, device=None, dtype=None, *, backend: str = "auto",
                 weight_offset: float = 0.0) -> None:
        super().__init__()
        if isinstance(weight_offset, bool) or not isinstance(weight_offset, (int, float)):
            raise TypeError(f"weight_offset: expected a float, got {type(weight_offset).__name__}")
        self.weight_offset = float(weight_offset)
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.constant_(self.weight, 1.0 - self.weight_offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != self.normalized_shape:
            raise ValueError(f"x: expected trailing dims {self.normalized_shape} (normalized_shape), "
                             f"got shape {tuple(x.shape)}")
        n = math.prod(self.normalized_shape)
        if self.weight is not None and self.weight_offset:
            # the offset is added in fp32 (Gemma's own norm forms 1 + w in fp32), then cast to x's dtype for the op
            weight = (self.weight.reshape(n).float() + self.weight_offset).to(x.dtype)
        elif self.weight is not None:
            weight = self.weight.reshape(n).to(x.dtype)
        else:
            weight = torch.ones(n, dtype=x.dtype, device=x.device)
        # torch.nn.RMSNorm's eps=None is the epsilon of the type it computes in: float32 for fp16/bf16 inputs
        eps = self.eps if self.eps is not None else torch.finfo(compute_dtype(x.dtype)).eps
        y = rms_norm(x.reshape(*x.shape[:x.dim() - k], n), weight, eps, backend=self.backend)
        return y.view(x.shape)

    def extra_repr(self) -> str:
        offset = f", weight_offset={self.weight_offset}" if self.weight_offset else ""
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}{offset}"


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm (same constructor, initialisation and state dict) computed by gf.layer_norm: fp32
    statistics, one fused kernel each way, deterministic weight and bias gradients.

    normalized_shape may span several trailing dims: they are flattened into one, whose mean and variance are
    the same. The output has x's dtype (weight and bias are cast to it); `backend` (keyword only, not in torch's
    signature) picks the gf backend."""

    def __init__(self, normalized_shape: int | list[int] | torch.Size, eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = len(self.normalized_shape)
        if tuple(x.shape[x.dim() - k:]) != tuple(self.normalized_shape):
            raise ValueError(f"x: expected trailing dims {tuple(self.normalized_shape)} (normalized_shape), "
                             f"got shape {tuple(x.shape)}")
        n = math.prod(self.normalized_shape)
        weight, bias = (p.reshape(n).to(x.dtype) if p is not None else None for p in (self.weight, self.bias))
        y = layer_norm(x.reshape(*x.shape[:x.dim() - k], n), weight, bias, self.eps, backend=self.backend)
        return y.view(x.shape)


class Linear(torch.nn.Linear):
    """torch.nn.Linear (same constructor, initialisation and state dict) whose forward is gf.matmul:
    y = x Wᵀ + b. `backend` (keyword only) picks the gf backend."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 backend: str = "auto") -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        y = matmul(flat, self.weight.T, backend=self.backend)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class Softmax(torch.nn.Module):
    """torch.nn.Softmax computed by gf.softmax. forward(x, mask=None): with a boolean `mask` (True = keep,
    broadcastable to x) masked entries get probability 0 and a fully masked row gives zeros (without a mask, a
    row of −inf gives NaN, as torch)."""

    def __init__(self, dim: int = -1, *, backend: str = "auto") -> None:
        super().__init__()
        self.dim, self.backend = dim, backend

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            return softmax(x, self.dim, backend=self.backend)
        y = softmax(x.masked_fill(~mask, float("-inf")), self.dim, backend=self.backend)
        return torch.nan_to_num(y, nan=0.0)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class ScaledDotProductAttention(torch.nn.Module):
    """softmax(q kᵀ · scale + mask) v: q (B, Hq, Sq, D), k/v (B, Hkv, Sk, D), Hq % Hkv == 0. Without `mask`
    it is one gf.flash_attention call; with a boolean `mask` (True = may attend, broadcastable to
    (B, Hq, Sq, Sk)) the scores are formed explicitly and normalised by gf.softmax (fully masked rows give
    zeros). `causal` aligns the last query with the last key (bottom-right), as gf.flash_attention."""

    def __init__(self, *, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend
        self.softmax = Softmax(-1, backend=backend)

    def forward(self, q, k, v, *, causal: bool = False, mask: torch.Tensor | None = None,
                scale: float | None = None) -> torch.Tensor:
        if mask is None:
            return flash_attention(q, k, v, causal=causal, scale=scale, backend=self.backend)
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        keep = mask & visibility_mask(q.shape[2], k.shape[2], -1, 0, q.device) if causal else mask
        return self.softmax((q @ k.transpose(-1, -2)) * scale, keep) @ v


class Attention(torch.nn.Module):
    """Grouped-query self-attention with RoPE, computed by gf.flash_attention (no S×S matrix in memory).

    The parameters are named as the reference models' GQAttention (wq, wk, wv, wo; Llama's layout), so its
    state dict loads here. RoPE rotates the pairs (x[2i], x[2i+1]) by pos·theta^(−2i/D), as the reference
    models do. forward(x (B, S, dim), start_pos=0) -> (B, S, dim); `causal` aligns bottom-right, `window`
    is gf.flash_attention's (left, right)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None, *,
                 max_seq_len: int = 4096, rope_theta: float = 10000.0, causal: bool = True,
                 window: tuple[int, int] | None = None, bias: bool = False, device=None, dtype=None,
                 backend: str = "auto") -> None:
        super().__init__()
        for name, value in (("dim", dim), ("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                            ("max_seq_len", max_seq_len)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        head_dim = dim // n_heads if head_dim is None else head_dim
        if head_dim < 1:
            raise ValueError(f"head_dim: dim={dim} // n_heads={n_heads} is 0; give head_dim")
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads: n_heads={n_heads} must be a multiple of n_kv_heads={n_kv_heads}")
        if head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head dim, got {head_dim}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal, self.window, self.backend = causal, window, backend
        factory = {"device": device, "dtype": dtype}
        self.wq = torch.nn.Linear(dim, n_heads * head_dim, bias=bias, **factory)
        self.wk = torch.nn.Linear(dim, n_kv_heads * head_dim, bias=bias, **factory)
        self.wv = torch.nn.Linear(dim, n_kv_heads * head_dim, bias=bias, **factory)
        self.wo = torch.nn.Linear(n_heads * head_dim, dim, bias=bias, **factory)
        # (max_seq_len, head_dim) tables in gf.rope's interleaved layout, fp32
        cos, sin = full_tables(*rope_angles(head_dim, max_seq_len, rope_theta), interleaved=True)
        self.register_buffer("rope_cos", cos.to(device=device, dtype=torch.float32), persistent=False)
        self.register_buffer("rope_sin", sin.to(device=device, dtype=torch.float32), persistent=False)

    def rope_tables(self, start_pos: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (S, D) cos/sin rows of absolute positions start_pos .. start_pos + S − 1."""
        if isinstance(start_pos, bool) or not isinstance(start_pos, int) or start_pos < 0:
            raise ValueError(f"start_pos: expected an int >= 0, got {start_pos!r}")
        if start_pos + s > self.rope_cos.shape[0]:
            raise ValueError(f"x: positions up to {start_pos + s} exceed max_seq_len {self.rope_cos.shape[0]}")
        return self.rope_cos[start_pos:start_pos + s], self.rope_sin[start_pos:start_pos + s]

    def forward(self, x: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = rope(q, k, *self.rope_tables(start_pos, s), interleaved=True, backend=self.backend)
        out = flash_attention(q, k, v, causal=self.causal, window=self.window, backend=self.backend)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))

    def extra_repr(self) -> str:
        return (f"n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, window={self.window}")
