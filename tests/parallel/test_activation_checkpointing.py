"""Activation checkpointing (full and selective, non-reentrant) leaves training unchanged: world size 2 on gloo,
float64, 5 steps of a small TinyLlama — DDP and ZeRO-3 (parameters vs one process without checkpointing) and
the pipelines 1F1B, interleaved 1F1B and ZB-H1, and TP (losses vs one process), all within 1e-12 — and the
activation ledger shows what it saves (one process: none > selective > full)."""

import copy

import pytest
import torch

from gpuforge.models.activation_checkpointing import checkpoint_blocks, saved_activation_bytes
from gpuforge.models.vol2_llm import TinyLlama, lm_loss, loss_fn, make_batch
from gpuforge.parallel.comm.ledger import MemoryLedger
from gpuforge.parallel.training.data_parallel import DataParallelTrainer
from gpuforge.parallel.training.gathered_loss import DataParallelLoss
from gpuforge.parallel.training.loop import run_steps
from gpuforge.parallel.training.trainer_3d import single_process_losses, train_model_parallel
from tests.parallel.dist_harness import run_distributed
from tests.parallel.test_tensor_parallel import S, tiny_config

STEPS, B, LR = 5, 4, 1e-2  # 20-step parity of each schedule is in its own test; here: the same with checkpointing
PIPELINES = [("pp", "1f1b", 1, "full"), ("pp", "interleaved-1f1b", 2, "selective"), ("pp", "zb-h1", 1, "full"),
             ("tp", "1f1b", 1, "selective")]


def _data_parallel(strategy, comm, policy):
    torch.manual_seed(0)
    model = TinyLlama(tiny_config(n_layers=4)).double()
    if policy is not None:
        checkpoint_blocks(model, policy)
    trainer = DataParallelTrainer(strategy, DataParallelLoss(model, loss_fn, comm), comm, lr=LR)
    world, rank = (1, 0) if comm is None else (comm.world_size, comm.rank)
    run_steps(trainer, lambda step: [tuple(t.chunk(world)[rank] for t in make_batch(step, B, S))], STEPS,
              max_norm=1.0)
    trainer.gather_full_params()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _suite(comm):
    out = {strategy: _data_parallel(strategy, comm, policy) for strategy, policy in (("ddp", "full"),
                                                                                    ("zero3", "selective"))}
    for strategy, schedule, v, policy in PIPELINES:
        degrees = {"pp": 2} if strategy == "pp" else {"tp": 2}
        out[(strategy, schedule)] = train_model_parallel(
            comm, **degrees, steps=STEPS, batch_size=B, seq_len=S, num_microbatches=2, schedule=schedule,
            num_chunks=v, lr=LR, config=tiny_config(n_layers=4), dtype=torch.float64, checkpoint_activations=policy)
    return out


@pytest.mark.distributed
def test_training_with_activation_checkpointing_matches_one_process_without():
    results = run_distributed(_suite, 2, timeout=300)
    single = _data_parallel("single", None, None)
    losses = single_process_losses(steps=STEPS, batch_size=B, seq_len=S, lr=LR, max_norm=1.0,
                                   config=tiny_config(n_layers=4), dtype=torch.float64)
    for res in results:
        for strategy in ("ddp", "zero3"):
            for name, p in single.items():
                assert (res[strategy][name] - p).abs().max().item() <= 1e-12, (strategy, name)
        for strategy, schedule, _, _ in PIPELINES:
            diff = max(abs(a - b) for a, b in zip(res[(strategy, schedule)], losses, strict=True))
            assert diff <= 1e-12, (strategy, schedule, diff)


def test_the_ledger_shows_what_checkpointing_saves():
    torch.manual_seed(0)
    ref = TinyLlama(tiny_config(n_layers=4)).double()
    x, y = make_batch(0, B, S)
    measured, grads = {}, {}
    for policy in (None, "selective", "full"):
        model = copy.deepcopy(ref)
        if policy is not None:
            assert len(checkpoint_blocks(model, policy)) == 4
        loss, measured[policy] = saved_activation_bytes(model, lambda m=model: lm_loss(m(x), y))
        loss.backward()
        grads[policy] = torch.cat([p.grad.flatten() for p in model.parameters()])
        ledger = MemoryLedger(params=0, grads=0, optimizer_state=0, activations=measured[policy])
        assert ledger.total == 0 and ledger.activations == measured[policy]  # activations are not model state
    assert measured[None] > measured["selective"] > measured["full"] > 0, measured
    assert torch.equal(grads[None], grads["full"]) and torch.equal(grads[None], grads["selective"])
    half = copy.deepcopy(ref)
    assert len(checkpoint_blocks(half, every=2)) == 2
    assert measured["full"] < saved_activation_bytes(half, lambda: lm_loss(half(x), y))[1] < measured[None]


def test_bad_arguments():
    model = TinyLlama(tiny_config())
    with pytest.raises(ValueError, match="policy must be one of"):
        checkpoint_blocks(model, "some")
    with pytest.raises(ValueError, match="every must be a positive int"):
        checkpoint_blocks(model, every=0)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        checkpoint_blocks("model")
    checkpoint_blocks(model)
    with pytest.raises(ValueError, match="already checkpointed"):
        checkpoint_blocks(model)
