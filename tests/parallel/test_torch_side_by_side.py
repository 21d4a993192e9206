"""Ours beside PyTorch's on the same model, data and loop (world size 2, gloo, float64): DDP beside
torch.nn.parallel.DistributedDataParallel, ZeRO-1 beside torch DDP + torch.distributed.optim.
ZeroRedundancyOptimizer, ZeRO-2 and ZeRO-3 beside `torch.distributed.fsdp.fully_shard` (reshard_after_forward
False / True). Same losses and gradient norms at every step and the same final parameters, to 1e-12, with
accumulation and clipping, for TinyLlama and TinyConvNeXt, and for TinyCLIP (gathered contrastive loss)
beside torch DDP and ZeRO only: `fully_shard` rejects scalar parameters (CLIP's logit_scale). Parameters
are compared as in test_parity_models (`max_param_diff`: less the noise-driven key biases)."""

import pytest

from gpuforge.parallel.training.data_parallel import OURS, THEIRS
from gpuforge.parallel.training.parity import TOLERANCE
from tests.parallel.dist_harness import run_distributed
from tests.parallel.test_parity_models import _train, max_param_diff

pytestmark = pytest.mark.distributed
STEPS = 5
PAIRS = [(name, ours) for name in ("tiny_llama", "tiny_convnext") for ours in OURS] + \
        [("tiny_clip", "ddp"), ("tiny_clip", "zero1")]


def _side_by_side(comm):
    return {(name, strategy): _train(name, "float64", strategy, comm, steps=STEPS)
            for name, ours in PAIRS for strategy in (ours, THEIRS[ours])}


def test_same_losses_and_parameters_as_torch():
    tolerance = TOLERANCE["float64"]
    for runs in run_distributed(_side_by_side, 2):
        for name, ours in PAIRS:
            (state, losses, norms), (t_state, t_losses, t_norms) = runs[name, ours], runs[name, THEIRS[ours]]
            where = f"{name}: {ours} vs {THEIRS[ours]}"
            assert losses == pytest.approx(t_losses, abs=tolerance, rel=0), where
            assert norms == pytest.approx(t_norms, abs=tolerance, rel=0), where
            assert max_param_diff(state, t_state) <= tolerance, where
