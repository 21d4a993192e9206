"""DDPM/DDIM on 2-D data, TinyDiT (adaLN-Zero, cross-attention) and the zero-initialised ControlNet branch."""

import torch

from gpuforge.models import vol3_generative as m3
from tests.models.training import train


def test_ddim_with_the_exact_noise_predictor_recovers_the_data_point():
    """For data = a single point x*, the optimal ε(x_t, t) = (x_t − √ᾱ_t x*) / √(1 − ᾱ_t); DDIM must land on x*."""
    target = torch.tensor([[1.5, -0.5]], dtype=torch.float64)
    a = m3.alpha_bars()

    def exact_eps(x, t):
        at = a[t][:, None]
        return (x - at.sqrt() * target) / (1 - at).sqrt()

    x_t = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m3.ddim_sample(exact_eps, x_t, 10), target.expand(5, -1), rtol=0, atol=1e-10)


def test_ddpm_loss_falls_and_ddim_samples_land_on_the_ring():
    torch.manual_seed(0)
    model = m3.Denoiser2D()
    losses = train(model, m3.make_ddpm_batch, m3.ddpm_loss, 250, 5e-3, 128)
    # the noise-prediction loss has a large irreducible part (≈ 0.5 here); the samples are the real check
    assert sum(losses[-20:]) / 20 < 0.75 * sum(losses[:5]) / 5, (losses[:5], losses[-20:])
    samples = m3.ddim_sample(model, torch.randn(256, 2, generator=torch.Generator().manual_seed(1)), 20)
    radius = samples.norm(dim=-1)
    noise_radius = torch.randn(256, 2, generator=torch.Generator().manual_seed(2)).norm(dim=-1)
    # data lie on the circle of radius 2; N(0, I) draws scatter around it with mean |r − 2| ≈ 0.9
    assert (radius - 2).abs().mean() < 0.6 * (noise_radius - 2).abs().mean()


def test_dit_blocks_start_as_identity_and_loss_falls():
    torch.manual_seed(0)
    model = m3.TinyDiT()
    x0, text, t, eps = m3.make_dit_batch(0, 4)
    h, cond, context = model.embed(x0, t, text)
    assert torch.equal(model.blocks[0](h, cond, context), h)  # adaLN-Zero gates are zero
    assert torch.equal(model(x0, t, text), torch.zeros_like(x0))
    losses = train(model, m3.make_dit_batch, m3.dit_loss, 60, 3e-3, 32)
    assert sum(losses[-5:]) / 5 < 0.7 * losses[0], (losses[0], losses[-5:])


def test_controlnet_equals_base_at_init_then_learns_from_its_control():
    torch.manual_seed(0)
    base = m3.pretrained_dit()  # a non-trivial base (a fresh TinyDiT's output is 0)
    control_net = m3.ControlNetDiT(base)
    x0, text, t, eps, control = m3.make_controlnet_batch(10**6, 256)
    x_t = m3.noisy(x0, t, eps)
    with torch.no_grad():
        base_out = base(x_t, t, text)
        assert base_out.abs().max() > 0
        assert torch.equal(control_net(x_t, t, text, control), base_out)
        base_loss = m3.controlnet_loss(control_net, (x0, text, t, eps, control)).item()
    assert all(not p.requires_grad for p in base.parameters())
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    train(control_net, m3.make_controlnet_batch, m3.controlnet_loss, 60, 1e-2, 16)
    with torch.no_grad():
        loss = m3.controlnet_loss(control_net, (x0, text, t, eps, control)).item()
        wrong_control = m3.controlnet_loss(control_net, (x0, text, t, eps, control.roll(1, 0))).item()
    assert all(torch.equal(v, frozen[k]) for k, v in base.state_dict().items())
    # held-out loss: measured 0.246 for the base, 0.124 after 60 steps; someone else's layout: 0.54
    assert loss < 0.6 * base_loss, (base_loss, loss)
    assert wrong_control > 2 * loss, (loss, wrong_control)  # it reads the control, not just more capacity
