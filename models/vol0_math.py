"""Volume 0, mathematical roots: a variational autoencoder and an MLP for optimizer and Hessian checks.

TinyVAE: MLP encoder q(z|x) = N(μ, diag σ²), reparameterised z = μ + σ ⊙ ε, MLP decoder; the negative ELBO is
the Gaussian reconstruction error ½‖x − x̂‖² plus the closed-form KL(N(μ, σ²) ‖ N(0, I)) =
½ Σ (μ² + σ² − 1 − log σ²). The noise ε comes with the batch, so the loss is deterministic given the seed.
TinyMLP: a regression MLP; `AdamW` is the optimizer written out step by step (it must match torch.optim.AdamW)
and `loss_hessian` the exact Hessian of the loss in the flattened parameters (saddle points, curvature).

gpuforge ops exercised: matmul (every nn.Linear), vector add. Parallel strategies: DDP, ZeRO (the optimizer
state m, v is what ZeRO shards).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gpuforge.models._layers import ReferenceModel, to_model_dtype

DATA_DIM, LATENT_DIM = 16, 2


def _data_map(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(LATENT_DIM, DATA_DIM, generator=generator)


def make_vae_batch(seed: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, eps): x (B, 16) lies near a curved 2-D manifold, x = tanh(u A) + 0.05 noise with u ~ N(0, I)
    and a fixed A; eps (B, 2) is the reparameterisation noise the loss uses."""
    mapping = _data_map(torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    u = torch.randn(batch_size, LATENT_DIM, generator=generator)
    x = torch.tanh(u @ mapping) + 0.05 * torch.randn(batch_size, DATA_DIM, generator=generator)
    return x, torch.randn(batch_size, LATENT_DIM, generator=generator)


class TinyVAE(nn.Module):
    """x (B, data_dim) -> (x̂, μ, log σ²) through a latent_dim-dimensional Gaussian code."""

    def __init__(self, data_dim: int = DATA_DIM, latent_dim: int = LATENT_DIM, hidden: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(data_dim, hidden), nn.SiLU(),
                                     nn.Linear(hidden, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, data_dim))

    def encode(self, x):
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def forward(self, x, eps):
        """-> (reconstruction, μ, log σ²) with z = μ + exp(½ log σ²) ⊙ eps."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * eps
        return self.decoder(z), mu, logvar


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(μ, diag σ²) ‖ N(0, I)) per row, in closed form."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


def vae_loss(model: TinyVAE, batch) -> torch.Tensor:
    """Negative ELBO per example, averaged: ½‖x − x̂‖² (unit-variance Gaussian decoder, constants dropped)
    + KL(q(z|x) ‖ p(z))."""
    x, eps = to_model_dtype(model, *batch)
    recon, mu, logvar = model(x, eps)
    return (0.5 * (x - recon).pow(2).sum(-1) + gaussian_kl(mu, logvar)).mean()


class TinyMLP(nn.Module):
    """in -> hidden -> hidden -> 1 with tanh: smooth, so its Hessian is well defined everywhere."""

    def __init__(self, in_dim: int = 8, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))

    def forward(self, x):
        return self.net(x).squeeze(-1)


def make_regression_batch(seed: int, batch_size: int, in_dim: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y): y = sin(x·w) + 0.5 (x₀ x₁) for a fixed w, plus 0.01 noise."""
    w = torch.randn(in_dim, generator=torch.Generator().manual_seed(99)) / math.sqrt(in_dim)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_dim, generator=generator)
    y = torch.sin(x @ w) + 0.5 * x[:, 0] * x[:, 1] + 0.01 * torch.randn(batch_size, generator=generator)
    return x, y


def mse_loss(model: TinyMLP, batch) -> torch.Tensor:
    x, y = to_model_dtype(model, *batch)
    return F.mse_loss(model(x), y)


def loss_hessian(model: nn.Module, loss_fn, batch) -> torch.Tensor:
    """The exact (P, P) Hessian of loss_fn(model, batch) in the flattened parameters (double backward)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(model, batch), params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    rows = []
    for gi in flat:
        row = torch.autograd.grad(gi, params, retain_graph=True)
        rows.append(torch.cat([r.reshape(-1) for r in row]))
    return torch.stack(rows)


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter), written out; matches torch.optim.AdamW.

    Per step t: θ ← θ(1 − lr·λ); m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²;
    θ ← θ − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else torch.enable_grad()(closure)()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - beta1 ** t))
        return loss


REFERENCE_MODELS = {
    "tiny_vae": ReferenceModel(TinyVAE, make_vae_batch, vae_loss),
    "tiny_mlp": ReferenceModel(TinyMLP, make_regression_batch, mse_loss),
}
