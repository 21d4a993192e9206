"""ZeroRedundancyOptimizer stages 1 and 2 vs one process on the concatenated batch (fp64, 1e-12), ledgers,
and side by side with torch.distributed.optim.ZeroRedundancyOptimizer."""

import pytest
import torch
import torch.nn.functional as F

from gpuforge.parallel.zero import ZeroRedundancyOptimizer
from tests.parallel.dist_harness import TiedMLP, make_batches, run_distributed, shard

pytestmark = pytest.mark.distributed
STEPS, PER_RANK, ACCUM, CLIP = 3, 4, 2, 0.05


def _reference(world):
    torch.manual_seed(0)
    model = TiedMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for x, y in make_batches(STEPS, world, PER_RANK):
        opt.zero_grad()
        for xm, ym in zip(x.chunk(ACCUM), y.chunk(ACCUM), strict=True):
            (F.mse_loss(model(xm), ym) / ACCUM).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return model.state_dict()


def _zero_parity(comm, stage):
    torch.manual_seed(0)
    model = TiedMLP()
    opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, comm, stage=stage, lr=0.05)
    comm.ledger.clear()
    memory = None
    for step, (x, y) in enumerate(make_batches(STEPS, comm.world_size, PER_RANK)):
        comm.ledger.step = step
        x, y = shard(x, comm.rank, comm.world_size), shard(y, comm.rank, comm.world_size)
        opt.zero_grad()
        for xm, ym in zip(x.chunk(ACCUM), y.chunk(ACCUM), strict=True):
            (F.mse_loss(model(xm), ym) / ACCUM).backward()
        opt.clip_grad_norm_(CLIP)
        memory = opt.memory()
        opt.step()
    ops = [(e.op, e.bytes) for e in comm.ledger.select(step=1)]
    return dict(state=model.state_dict(), ops=ops, padded=opt.padded, numel=opt.numel, shard=opt.shard_size,
                memory=memory)


@pytest.mark.parametrize("stage,world,kind", [(1, 2, "torch"), (2, 2, "torch"), (2, 4, "torch"), (2, 2, "mpi")])
def test_zero_matches_single_process_fp64(stage, world, kind):
    results = run_distributed(_zero_parity, world, stage, comm=kind)
    ref = _reference(world)
    for res in results:
        for name, value in ref.items():
            assert (res["state"][name] - value).abs().max().item() <= 1e-12, name
    res = results[0]
    b = 8 * res["padded"]
    grad_op = "all_reduce" if stage == 1 else "reduce_scatter"
    # per step: the gradient reduction, the clip's one-scalar all-reduce, the parameter all-gather
    assert res["ops"] == [(grad_op, b), ("all_reduce", 8), ("all_gather", b)]
    mem, psi, s = res["memory"], res["numel"], res["shard"]
    assert mem.params == 8 * psi
    assert mem.grads == (8 * res["padded"] if stage == 1 else 8 * s)  # stage 1: full; stage 2: the shard
    assert mem.optimizer_state == 3 * 8 * s  # fp64 master shard + Adam's two moments, 1/N each


def _side_by_side(comm):
    from torch.distributed.optim import ZeroRedundancyOptimizer as TorchZero

    torch.manual_seed(0)
    ours, theirs = TiedMLP(), TiedMLP()
    theirs.load_state_dict(ours.state_dict())
    opt_ours = ZeroRedundancyOptimizer(ours.parameters(), torch.optim.AdamW, comm, stage=2, lr=0.05)
    ddp_theirs = torch.nn.parallel.DistributedDataParallel(theirs)
    opt_theirs = TorchZero(theirs.parameters(), optimizer_class=torch.optim.AdamW, lr=0.05)
    losses = {"ours": [], "theirs": []}
    for x, y in make_batches(4, comm.world_size, PER_RANK):
        x, y = shard(x, comm.rank, comm.world_size), shard(y, comm.rank, comm.world_size)
        for key, model, opt in (("ours", ours, opt_ours), ("theirs", ddp_theirs, opt_theirs)):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    return losses


def test_same_losses_as_torch_zero_redundancy_optimizer():
    for losses in run_distributed(_side_by_side, 2):
        assert losses["ours"] == pytest.approx(losses["theirs"], rel=1e-10, abs=0)


def test_bad_stage_is_rejected():
    with pytest.raises(ValueError, match="stage must be 1 or 2"):
        ZeroRedundancyOptimizer(TiedMLP().parameters(), torch.optim.SGD, comm=None, stage=3, lr=0.1)
