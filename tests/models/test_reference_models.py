"""The uniform interface of every registered reference model (gf.models.reference_models()): deterministic
batches, float64 losses and gradients, and the property data parallelism relies on: unless the entry is
flagged `coupled`, the loss of a batch equals the mean of the losses of its two halves (each rank of
`gpuforge train` holds one slice along dim 0), for the gradients too."""

import pytest
import torch

import gpuforge as gf

REGISTRY = gf.models.reference_models()
TRAINABLE = sorted(name for name, ref in REGISTRY.items() if not ref.inference_only)
DECOMPOSABLE = sorted(name for name in TRAINABLE if not REGISTRY[name].coupled)


def _build(name, dtype):
    torch.manual_seed(0)
    return REGISTRY[name].build().to(dtype)


def test_every_volume_registers_models_and_only_clip_is_coupled():
    volumes = {ref.build.__module__ for ref in REGISTRY.values()}
    assert len(volumes) == len(gf.models.VOLUMES), volumes
    assert {"ppo_actor_critic", "controlnet_dit", "tiny_llama_lora", "int4_tiny_llama"} <= set(REGISTRY)
    assert sorted(name for name, ref in REGISTRY.items() if ref.coupled) == ["tiny_clip"]
    assert sorted(name for name, ref in REGISTRY.items() if ref.inference_only) == ["int4_tiny_llama"]
    build, make_batch, loss_fn = REGISTRY["tiny_llama"]  # an entry still unpacks as the triple
    assert (build, make_batch, loss_fn) == (REGISTRY["tiny_llama"].build, REGISTRY["tiny_llama"].make_batch,
                                            REGISTRY["tiny_llama"].loss_fn)


@pytest.mark.parametrize("name", TRAINABLE)
def test_deterministic_float64_loss_and_gradients(name):
    make_batch, loss_fn = REGISTRY[name].make_batch, REGISTRY[name].loss_fn
    batch = make_batch(5, 4)
    for a, b in zip(batch, make_batch(5, 4), strict=True):
        assert torch.equal(a, b) and a.shape[0] == 4
    model = _build(name, torch.float64)
    loss = loss_fn(model, batch)
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert loss_fn(_build(name, torch.float64), batch).item() == loss.item()


def _loss_and_grads(model, loss_fn, batch):
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model, batch)
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("name", DECOMPOSABLE)
def test_loss_of_a_batch_is_the_mean_of_its_halves(name):
    """What data parallelism needs: one process on the whole batch == the mean over ranks of each rank's slice
    (as gpuforge train slices it, t.chunk(world)[rank]), for the loss and every gradient, in float64."""
    ref = REGISTRY[name]
    model = _build(name, torch.float64)
    batch = ref.make_batch(11, 8)  # 8: the decision transformer's halves then hold different episode lengths
    full_loss, full_grads = _loss_and_grads(model, ref.loss_fn, batch)
    halves = [_loss_and_grads(model, ref.loss_fn, tuple(t.chunk(2)[rank] for t in batch)) for rank in (0, 1)]
    torch.testing.assert_close((halves[0][0] + halves[1][0]) / 2, full_loss, rtol=1e-12, atol=1e-12)
    for g_full, g0, g1 in zip(full_grads, halves[0][1], halves[1][1], strict=True):
        scale = max(g_full.abs().max().item(), 1e-12)
        torch.testing.assert_close((g0 + g1) / 2, g_full, rtol=1e-10, atol=1e-12 * scale)


def test_coupled_models_really_are_coupled():
    """The flag is not decoration: for CLIP the halves' mean loss differs from the whole batch's (each half
    lacks the other half's negatives)."""
    for name in sorted(set(TRAINABLE) - set(DECOMPOSABLE)):
        ref = REGISTRY[name]
        model = _build(name, torch.float64)
        batch = ref.make_batch(11, 4)
        with torch.no_grad():
            full = ref.loss_fn(model, batch).item()
            halves = [ref.loss_fn(model, tuple(t.chunk(2)[rank] for t in batch)).item() for rank in (0, 1)]
        assert abs(sum(halves) / 2 - full) > 1e-3 * abs(full), (name, full, halves)


@pytest.mark.parametrize("name", sorted(set(REGISTRY) - set(TRAINABLE)))
def test_inference_only_models_score_deterministically_per_sample(name):
    """Evaluated in float32 (int4 GEMM takes no float64): a finite loss, the same for a rebuilt model, and
    still the mean of its halves' losses."""
    ref = REGISTRY[name]
    batch = ref.make_batch(5, 4)
    with torch.no_grad():
        loss = ref.loss_fn(_build(name, torch.float32), batch)
        assert torch.isfinite(loss) and ref.loss_fn(_build(name, torch.float32), batch).item() == loss.item()
        halves = [ref.loss_fn(_build(name, torch.float32), tuple(t.chunk(2)[r] for t in batch)) for r in (0, 1)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, loss, rtol=1e-5, atol=1e-6)
