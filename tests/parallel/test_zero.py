"""ZeroRedundancyOptimizer stages 1 and 2 vs one process on the concatenated batch (fp64, 1e-12), with and
without CPU offload; the communication ledger against the theory; side by side with
torch.distributed.optim.ZeroRedundancyOptimizer; bad use (mismatched ranks, devices)."""

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from gpuforge.parallel.data_parallel.zero import ZeroRedundancyOptimizer
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


def _zero_parity(comm, stage, offload=None):
    torch.manual_seed(0)
    model = TiedMLP()
    opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, comm, zero_stage=stage, offload=offload,
                                  lr=0.05)
    comm.ledger.clear()
    memory = None
    for step, (x, y) in enumerate(make_batches(STEPS, comm.world_size, PER_RANK)):
        comm.ledger.step = step
        x, y = shard(x, comm.rank, comm.world_size), shard(y, comm.rank, comm.world_size)
        opt.zero_grad()
        for xm, ym in zip(x.chunk(ACCUM), y.chunk(ACCUM), strict=True):
            (F.mse_loss(model(xm), ym) / ACCUM).backward()
        opt.reduce_gradients()
        memory = opt.memory()
        opt.clip_grad_norm_(CLIP)
        opt.step()
    return dict(state=model.state_dict(), wire=comm.ledger.wire_bytes(step=1), padded=opt.padded, numel=opt.numel,
                shard=opt.shard_size, memory=memory)


@pytest.mark.parametrize("stage,world,kind,offload", [(1, 2, "torch", None), (1, 4, "torch", "cpu"),
                                                      (2, 2, "torch", "cpu"), (2, 4, "torch", None),
                                                      (2, 2, "mpi", None)])
def test_zero_matches_single_process_fp64(stage, world, kind, offload):
    results = run_distributed(_zero_parity, world, stage, offload, comm=kind)
    ref = _reference(world)
    for res in results:
        for name, value in ref.items():
            assert (res["state"][name] - value).abs().max().item() <= 1e-12, name
    res = results[0]
    b, ring = 8 * res["padded"], Fraction(world - 1, world)
    # theory per step: every gradient byte reduced once and every parameter byte gathered once (2(N-1)/N·Ψ·B,
    # DDP's all-reduce volume), plus the clip's one-scalar all-reduce
    assert res["wire"] == 2 * ring * b + 2 * ring * 8
    mem, psi, s = res["memory"], res["numel"], res["shard"]
    assert mem.params == 8 * psi
    assert mem.grads == (8 * res["padded"] if stage == 1 else 8 * s)  # stage 1: the full buffer; stage 2: the shard
    master_and_state = 8 * s + 2 * 8 * s  # fp64 master shard + Adam's two moments, 1/N each
    if offload:
        assert (mem.master, mem.optimizer_state, mem.offloaded) == (0, 0, master_and_state)
    else:
        assert (mem.master, mem.optimizer_state, mem.offloaded) == (8 * s, 2 * 8 * s, 0)


def _side_by_side(comm):
    from torch.distributed.optim import ZeroRedundancyOptimizer as TorchZero

    torch.manual_seed(0)
    ours, theirs = TiedMLP(), TiedMLP()
    theirs.load_state_dict(ours.state_dict())
    opt_ours = ZeroRedundancyOptimizer(ours.parameters(), torch.optim.AdamW, comm, zero_stage=2, lr=0.05)
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


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="zero_stage: expected 1 or 2"):
        ZeroRedundancyOptimizer(TiedMLP().parameters(), torch.optim.SGD, comm=None, zero_stage=3, lr=0.1)
    with pytest.raises(ValueError, match="offload must be None or 'cpu'"):
        ZeroRedundancyOptimizer(TiedMLP().parameters(), torch.optim.SGD, comm=None, offload="nvme", lr=0.1)
    split = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))]
    with pytest.raises(ValueError, match="params: all parameters must be on one device"):
        ZeroRedundancyOptimizer(split, torch.optim.SGD, comm=None, lr=0.1)


def _mismatched_config(comm):
    torch.manual_seed(0)
    model = TiedMLP(h=8 + comm.rank) if comm.rank == 1 else TiedMLP()  # rank 1: other shapes and stage 2
    try:
        ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, comm, zero_stage=1 + comm.rank, lr=0.05)
    except ValueError as exc:
        return str(exc)
    return None


def test_mismatched_configurations_raise_on_every_rank():
    for message in run_distributed(_mismatched_config, 2, comm_timeout=20):
        assert message is not None
        assert "mismatched configurations between ranks (zero_stage, numel, shapes differ)" in message
        assert "rank 0: zero_stage=1" in message and "rank 1: zero_stage=2" in message
