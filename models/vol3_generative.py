"""Volume 3, generative models: DDPM/DDIM on 2-D data, TinyDiT with cross-attention, a ControlNet branch.

DDPM: x_t = √ᾱ_t x₀ + √(1 − ᾱ_t) ε, an MLP ε_θ(x_t, t) trained on ‖ε − ε_θ‖² (data: a ring of 8 Gaussians).
DDIM (η = 0) samples deterministically: x̂₀ = (x_t − √(1 − ᾱ_t) ε_θ) / √ᾱ_t, x_s = √ᾱ_s x̂₀ + √(1 − ᾱ_s) ε_θ.
TinyDiT: patchify an 8×8 latent into 2×2 patches, blocks of self-attention, cross-attention to text tokens
(Sq = 16 ≠ Sk = 3) and an MLP, each modulated by adaLN-Zero (shift, scale, gate from the timestep embedding,
all zero at init, so every block starts as the identity). ControlNetDiT: a trainable copy of the blocks fed
with the control image through a zero-initialised projection, added back through zero-initialised layers: at
initialisation its output equals the frozen base model's exactly; it is registered over a briefly trained base
(`pretrained_dit`) and learns from a control image carrying the layout.

gpuforge ops exercised: flash_attention (non-causal, Sq ≠ Sk), matmul, layer_norm (without affine parameters).
Parallel: DDP, TP, PP, ZeRO-3.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.models._layers import Attention, ReferenceModel, to_model_dtype

T_STEPS = 100


def alpha_bars(steps: int = T_STEPS, dtype=torch.float64) -> torch.Tensor:
    """ᾱ_t = Π_{s ≤ t} (1 − β_s) for a linear β schedule from 1e-4 to 0.05 (ᾱ at the last step ≈ 0.08)."""
    betas = torch.linspace(1e-4, 0.05, steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0).to(dtype)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the integer timestep, (B,) -> (B, dim)."""
    freqs = torch.exp(-math.log(1000.0) * torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = t.double()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def noisy(x0, t, eps):
    a = alpha_bars(dtype=x0.dtype)[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


# ----------------------------------------------------------------------------------------------- 2-D DDPM

def make_ddpm_batch(seed: int, batch_size: int):
    """(x0 (B, 2) from 8 Gaussians of std 0.1 on a circle of radius 2, t (B,) in [0, T), eps (B, 2))."""
    generator = torch.Generator().manual_seed(seed)
    angle = torch.randint(8, (batch_size,), generator=generator) * (2 * math.pi / 8)
    x0 = 2 * torch.stack([angle.cos(), angle.sin()], -1) + 0.1 * torch.randn(batch_size, 2, generator=generator)
    t = torch.randint(T_STEPS, (batch_size,), generator=generator)
    return x0, t, torch.randn(batch_size, 2, generator=generator)


class Denoiser2D(nn.Module):
    """ε_θ(x_t, t): an MLP on [x_t, sinusoidal(t)]."""

    def __init__(self, hidden: int = 128, time_dim: int = 16):
        super().__init__()
        self.time_dim = time_dim
        self.net = nn.Sequential(nn.Linear(2 + time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2))

    def forward(self, x, t):
        return self.net(torch.cat([x, timestep_embedding(t, self.time_dim).to(x.dtype)], dim=-1))


def ddpm_loss(model: nn.Module, batch) -> torch.Tensor:
    x0, t, eps = to_model_dtype(model, *batch)
    return F.mse_loss(model(noisy(x0, t, eps), t), eps)


@torch.no_grad()
def ddim_sample(eps_model, x_t: torch.Tensor, n_steps: int = 20) -> torch.Tensor:
    """Deterministic DDIM (η = 0) from the last timestep down to x₀ along n_steps evenly spaced timesteps.
    eps_model(x, t) takes t as a (B,) integer tensor."""
    a = alpha_bars(dtype=x_t.dtype)
    times = torch.linspace(T_STEPS - 1, 0, n_steps).round().long().tolist()
    x = x_t
    for i, t in enumerate(times):
        eps = eps_model(x, torch.full((x.shape[0],), t, dtype=torch.int64))
        x0_hat = (x - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
        a_next = a[times[i + 1]] if i + 1 < len(times) else torch.ones((), dtype=x.dtype)
        x = a_next.sqrt() * x0_hat + (1 - a_next).sqrt() * eps
    return x


# ----------------------------------------------------------------------------------------------- TinyDiT

LATENT, PATCH, N_CLASSES, CTX_LEN, CTX_VOCAB = 8, 2, 4, 3, 8


def make_dit_batch(seed: int, batch_size: int):
    """(x0 (B, 1, 8, 8), text (B, 3) int64, t, eps): class k draws a bright k-th quadrant (+1, else −1, plus
    0.1 noise); the text is [k, k + 4, k] so the class reaches the model only through cross-attention."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(N_CLASSES, (batch_size,), generator=generator)
    quadrant = torch.zeros(N_CLASSES, LATENT, LATENT)
    for k in range(N_CLASSES):
        r, c = divmod(k, 2)
        quadrant[k, r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] = 1
    x0 = (2 * quadrant[labels] - 1 + 0.1 * torch.randn(batch_size, LATENT, LATENT, generator=generator))[:, None]
    text = torch.stack([labels, labels + 4, labels], dim=1)
    t = torch.randint(T_STEPS, (batch_size,), generator=generator)
    return x0, text, t, torch.randn(x0.shape, generator=generator)


def patchify(x):  # (B, 1, 8, 8) -> (B, 16, 4)
    b = x.shape[0]
    return x.unfold(2, PATCH, PATCH).unfold(3, PATCH, PATCH).reshape(b, -1, PATCH * PATCH)


def unpatchify(tokens):  # (B, 16, 4) -> (B, 1, 8, 8)
    b, g = tokens.shape[0], LATENT // PATCH
    return tokens.view(b, g, g, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(b, 1, LATENT, LATENT)


class MultiHeadAttention(nn.Module):
    """Self-attention (context=None) or cross-attention to `context`; non-causal."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.attn = Attention()

    def forward(self, x, context=None):
        context = x if context is None else context
        b, sq, d = x.shape
        q = self.q(x).view(b, sq, self.heads, -1).transpose(1, 2)
        k, v = self.kv(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.out(self.attn(q, k, v).transpose(1, 2).reshape(b, sq, d))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6) for _ in range(3))
        self.self_attn, self.cross_attn = MultiHeadAttention(dim, heads), MultiHeadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.adaLN = nn.Linear(dim, 9 * dim)  # adaLN-Zero: shift, scale, gate for each of the 3 sub-layers
        nn.init.zeros_(self.adaLN.weight)
        nn.init.zeros_(self.adaLN.bias)

    def forward(self, x, cond, context):
        mods = self.adaLN(F.silu(cond))[:, None].chunk(9, dim=-1)
        sublayers = (self.self_attn, lambda h: self.cross_attn(h, context), self.mlp)
        for i, sublayer in enumerate(sublayers):
            shift, scale, gate = mods[3 * i:3 * i + 3]
            x = x + gate * sublayer(self.norms[i](x) * (1 + scale) + shift)
        return x


class TinyDiT(nn.Module):
    """forward(x_t (B, 1, 8, 8), t (B,), text (B, 3)) -> predicted noise (B, 1, 8, 8)."""

    def __init__(self, dim: int = 32, depth: int = 2, heads: int = 2):
        super().__init__()
        self.dim = dim
        self.patch_embed = nn.Linear(PATCH * PATCH, dim)
        self.pos = nn.Parameter(torch.randn(1, (LATENT // PATCH) ** 2, dim) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.text_embed = nn.Embedding(CTX_VOCAB, dim)
        self.blocks = nn.ModuleList(DiTBlock(dim, heads) for _ in range(depth))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Linear(dim, 2 * dim)
        self.final = nn.Linear(dim, PATCH * PATCH)
        for layer in (self.final_adaLN, self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def embed(self, x, t, text):
        cond = self.time_mlp(timestep_embedding(t, self.dim).to(x.dtype))
        return self.patch_embed(patchify(x)) + self.pos, cond, self.text_embed(text)

    def head(self, h, cond):
        shift, scale = self.final_adaLN(F.silu(cond))[:, None].chunk(2, dim=-1)
        return unpatchify(self.final(self.final_norm(h) * (1 + scale) + shift))

    def forward(self, x, t, text):
        h, cond, context = self.embed(x, t, text)
        for block in self.blocks:
            h = block(h, cond, context)
        return self.head(h, cond)


def dit_loss(model: nn.Module, batch) -> torch.Tensor:
    x0, text, t, eps = to_model_dtype(model, *batch)
    return F.mse_loss(model(noisy(x0, t, eps), t, text), eps)


class ControlNetDiT(nn.Module):
    """A frozen TinyDiT plus a trainable copy of its blocks that reads a control image (B, 1, 8, 8).

    The control enters through a zero-initialised patch projection and each copied block's output is added
    to the base stream through a zero-initialised Linear, so at initialisation forward == base forward."""

    def __init__(self, base: TinyDiT):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.control_blocks = copy.deepcopy(base.blocks)
        for p in self.control_blocks.parameters():
            p.requires_grad_(True)
        self.control_in = nn.Linear(PATCH * PATCH, base.dim)
        self.zero_out = nn.ModuleList(nn.Linear(base.dim, base.dim) for _ in base.blocks)
        for layer in (self.control_in, *self.zero_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, t, text, control):
        h, cond, context = self.base.embed(x, t, text)
        hc = h + self.control_in(patchify(control))
        for block, control_block, zero in zip(self.base.blocks, self.control_blocks, self.zero_out, strict=True):
            hc = control_block(hc, cond, context)
            h = block(h, cond, context) + zero(hc)
        return self.base.head(h, cond)


def pretrained_dit(steps: int = 20, batch_size: int = 16, lr: float = 1e-2) -> TinyDiT:
    """A TinyDiT after a few AdamW steps on its task: the stand-in for a pretrained base. (A fresh TinyDiT's
    zero-initialised output layer would give every ControlNet parameter a zero gradient.)"""
    base = TinyDiT()
    optimizer = torch.optim.AdamW(base.parameters(), lr=lr)
    for step in range(steps):
        loss = dit_loss(base, make_dit_batch(step, batch_size))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    base.zero_grad()  # no stale gradients on what becomes the frozen base
    return base


def make_controlnet_batch(seed: int, batch_size: int):
    """(x0, text, t, eps, control): make_dit_batch's image and noise, a caption of a random class (it says
    nothing about the image), and the control image (B, 1, 8, 8) = sign(x0), the clean quadrant layout, as
    a pose or edge map gives ControlNet the layout. Apart from x_t itself, only the control tells where the
    bright quadrant is."""
    x0, _, t, eps = make_dit_batch(seed, batch_size)
    generator = torch.Generator().manual_seed(seed + 1)
    labels = torch.randint(N_CLASSES, (batch_size,), generator=generator)
    text = torch.stack([labels, labels + 4, labels], dim=1)
    return x0, text, t, eps, x0.sign()


def controlnet_loss(model: ControlNetDiT, batch) -> torch.Tensor:
    x0, text, t, eps, control = to_model_dtype(model, *batch)
    return F.mse_loss(model(noisy(x0, t, eps), t, text, control), eps)


REFERENCE_MODELS = {
    "ddpm_2d": ReferenceModel(Denoiser2D, make_ddpm_batch, ddpm_loss),
    "tiny_dit": ReferenceModel(TinyDiT, make_dit_batch, dit_loss),
    "controlnet_dit": ReferenceModel(lambda: ControlNetDiT(pretrained_dit()), make_controlnet_batch,
                                     controlnet_loss),
}
