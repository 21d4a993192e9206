"""TinyVAE (ELBO with closed-form KL), the written-out AdamW, and the exact Hessian of the MLP."""

import pytest
import torch

from gpuforge.models import vol0_math as m0
from tests.models.training import train


def _train(name, steps, lr, batch_size=64):
    build, make_batch, loss_fn = m0.REFERENCE_MODELS[name]
    torch.manual_seed(0)
    model = build()
    written_out_adamw = lambda params, lr: m0.AdamW(params, lr=lr, weight_decay=0.0)
    return model, train(model, make_batch, loss_fn, steps, lr, batch_size, optimizer=written_out_adamw)


def test_vae_elbo_improves():
    _, losses = _train("tiny_vae", 60, 1e-2)
    # at init the loss is ~ ½·Σ E[x²] ≈ 3.2, which is also what a decoder ignoring z (E[x] ≈ 0) would get;
    # below 2.4 the latent code carries information about x
    assert losses[0] > 3.0 and sum(losses[-10:]) / 10 < 2.4, (losses[0], losses[-10:])


def test_closed_form_kl_matches_torch_distributions_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    exact = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(m0.gaussian_kl(mu, logvar), exact, rtol=1e-12, atol=1e-12)
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    torch.testing.assert_close(mc, exact, rtol=0.02, atol=0.02)


def test_mlp_regression_loss_falls():
    _, losses = _train("tiny_mlp", 80, 1e-2)
    assert sum(losses[-10:]) / 10 < 0.25 * losses[0], (losses[0], losses[-10:])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_written_out_adamw_equals_torch_adamw(weight_decay):
    torch.manual_seed(0)
    ours = m0.TinyMLP().double()
    theirs = m0.TinyMLP().double()
    theirs.load_state_dict(ours.state_dict())
    opt_ours = m0.AdamW(ours.parameters(), lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=3e-2, betas=(0.8, 0.95), eps=1e-6,
                                   weight_decay=weight_decay, foreach=False)
    for step in range(20):
        batch = m0.make_regression_batch(step, 16)
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            m0.mse_loss(model, batch).backward()
            opt.step()
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert not torch.equal(ours.net[0].weight, m0.TinyMLP().double().net[0].weight)


def test_exact_hessian_is_symmetric_and_matches_gradient_differences():
    torch.manual_seed(0)
    model = m0.TinyMLP(in_dim=3, hidden=4).double()
    batch = m0.make_regression_batch(0, 8, in_dim=3)
    h = m0.loss_hessian(model, m0.mse_loss, batch)
    n = sum(p.numel() for p in model.parameters())
    assert h.shape == (n, n)
    torch.testing.assert_close(h, h.T, rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    flat = torch.nn.utils.parameters_to_vector(params).detach()
    direction = torch.randn(n, dtype=torch.float64)

    def grad_at(theta):
        torch.nn.utils.vector_to_parameters(theta, params)
        g = torch.autograd.grad(m0.mse_loss(model, batch), params)
        return torch.cat([x.reshape(-1) for x in g])

    step = 1e-5
    fd = (grad_at(flat + step * direction) - grad_at(flat - step * direction)) / (2 * step)
    torch.testing.assert_close(h @ direction, fd, rtol=1e-6, atol=1e-8)
    eig = torch.linalg.eigvalsh(h)
    assert eig.min() < 0 < eig.max()  # at a random point the loss surface is a saddle, not a bowl
