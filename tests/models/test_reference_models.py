"""The uniform interface every volume exposes: REFERENCE_MODELS name -> (build, make_batch, loss_fn)."""

import pytest
import torch

import gpuforge as gf

VOLUMES = [gf.models.vol0_math, gf.models.vol1_architectures, gf.models.vol2_llm, gf.models.vol3_generative,
           gf.models.vol4_multimodal, gf.models.vol5_rl]
CASES = [(vol.__name__.rsplit(".", 1)[1], name) for vol in VOLUMES for name in vol.REFERENCE_MODELS]


@pytest.mark.parametrize("volume, name", CASES)
def test_deterministic_float64_loss_and_gradients(volume, name):
    build, make_batch, loss_fn = getattr(gf.models, volume).REFERENCE_MODELS[name]
    for a, b in zip(make_batch(5, 4), make_batch(5, 4), strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(0)
    model = build().double()
    loss = loss_fn(model, make_batch(5, 4))
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    torch.manual_seed(0)
    again = build().double()
    assert loss_fn(again, make_batch(5, 4)).item() == loss.item()
