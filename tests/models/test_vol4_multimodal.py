"""TinyCLIP (symmetric InfoNCE, sharded = full batch once gathered) and the LLaVA-style projector."""

import math

import torch

from gpuforge.models import vol4_multimodal as m4
from tests.models.training import train


def test_clip_loss_falls_below_what_a_fixed_temperature_allows():
    """Start at s = exp(logit_scale) = 1. With s fixed at 1, no embeddings can bring the loss of 16 pairs
    below ln(1 + 15·e^(−1 − 1/15)) = 1.82 (unit vectors: diagonal cosine ≤ 1, the best off-diagonal is a
    simplex's −1/15); going below it takes a learned temperature. logit_scale gets its own learning rate, as
    one scalar moved by AdamW at 3e-3 a step would need hundreds of steps. Measured: loss 2.79 -> 0.83,
    logit_scale 0 -> 2.23 (a fixed s = 1 run ends at 2.13)."""
    torch.manual_seed(0)
    model = m4.TinyCLIP()
    with torch.no_grad():
        model.logit_scale.zero_()

    def optimizer(_, lr):
        others = [p for name, p in model.named_parameters() if name != "logit_scale"]
        return torch.optim.AdamW([{"params": others}, {"params": [model.logit_scale], "lr": 5e-2}], lr=lr)

    losses = train(model, m4.make_batch, m4.contrastive_loss, 60, 3e-3, 16, optimizer=optimizer)
    floor_at_fixed_scale = math.log(1 + 15 * math.exp(-1 - 1 / 15))
    assert losses[0] > 2.5  # chance is ln 16 = 2.77 for 16 pairs
    assert sum(losses[-5:]) / 5 < 0.75 * floor_at_fixed_scale, losses[-5:]
    assert model.logit_scale.item() > 1.5  # s > 4.5: sharper than at the start


def test_sharded_clip_loss_equals_full_batch_once_gathered():
    torch.manual_seed(0)
    model = m4.TinyCLIP().double()
    images, captions = m4.make_batch(3, 12)
    images = images.double()
    full = m4.clip_loss(*model(images, captions), model.logit_scale)
    full_grads = torch.autograd.grad(full, list(model.parameters()))
    world, n = 3, 4
    shards = [model(images[r * n:(r + 1) * n], captions[r * n:(r + 1) * n]) for r in range(world)]
    image_all = torch.cat([s[0] for s in shards])  # what an all-gather hands every rank
    text_all = torch.cat([s[1] for s in shards])
    per_rank = [m4.clip_loss_shard(*shards[r], image_all, text_all, r * n, model.logit_scale) for r in range(world)]
    sharded = sum(per_rank) / world
    torch.testing.assert_close(sharded, full, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(sharded, list(model.parameters()))
    for g, ref in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
    # the trap: without the gather each rank only sees its own 4 negatives, and the loss is different
    local_only = sum(m4.clip_loss(*s, model.logit_scale) for s in shards) / world
    assert abs(local_only.item() - full.item()) > 1e-3


def test_llava_stage1_freezes_all_but_the_projector_and_captions_are_learned():
    torch.manual_seed(0)
    model = m4.TinyLlava()
    model.freeze_for_stage1()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"projector"}
    for p in model.llm.parameters():  # stage 2: projector and language model, the vision tower stays frozen
        p.requires_grad_(True)
    frozen_before = model.vision.patch_embed.weight.clone()
    losses = train(model, m4.make_caption_batch, m4.caption_loss, 40, 5e-3, 16)
    assert torch.equal(model.vision.patch_embed.weight, frozen_before)
    assert losses[0] > 5.0 and sum(losses[-5:]) / 5 < 1.5, (losses[0], losses[-5:])
