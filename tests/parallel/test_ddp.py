"""gf.parallel.DistributedDataParallel vs one process on the concatenated batch, on gloo and MPI."""

import pytest
import torch
import torch.nn.functional as F

from gpuforge.parallel.data_parallel.ddp import DistributedDataParallel
from tests.parallel.dist_harness import TiedMLP, make_batches, run_distributed, shard

pytestmark = pytest.mark.distributed
STEPS, PER_RANK, ACCUM, CLIP = 3, 4, 2, 0.05


def _train(model, batches, step_fn, opt, accum, clip, ledger=None):
    losses = []
    for step, (x, y) in enumerate(batches):
        if ledger is not None:
            ledger.step = step
        opt.zero_grad()
        total = 0.0
        for i, (xm, ym) in enumerate(zip(x.chunk(accum), y.chunk(accum), strict=True)):
            loss = F.mse_loss(step_fn(xm, last=i == accum - 1), ym) / accum
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        losses.append(total)
    return losses


def _reference(world, unused):
    torch.manual_seed(0)
    model = TiedMLP(unused=unused)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    _train(model, make_batches(STEPS, world, PER_RANK), lambda x, last: model(x), opt, ACCUM, CLIP)
    return model.state_dict()


def _ddp_parity(comm, unused, caps):
    torch.manual_seed(comm.rank)  # different init per rank: DDP must broadcast rank 0's
    model = TiedMLP(unused=unused)
    if comm.rank == 0:
        torch.manual_seed(0)
        model.load_state_dict(TiedMLP(unused=unused).state_dict())
    ddp = DistributedDataParallel(model, comm, find_unused_parameters=unused, bucket_cap_mb=caps,
                                  first_bucket_cap_mb=caps / 4)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    batches = [(shard(x, comm.rank, comm.world_size), shard(y, comm.rank, comm.world_size))
               for x, y in make_batches(STEPS, comm.world_size, PER_RANK)]

    def step(x, last):
        if last:
            return ddp(x)
        with ddp.no_sync():
            return ddp(x)

    comm.ledger.clear()  # drop the set-up (config check, parameter broadcast)
    _train(model, batches, step, opt, ACCUM, CLIP, comm.ledger)
    grad_bytes = sum(p.numel() * 8 for p in ddp.params)
    return dict(state=model.state_dict(), buckets=len(ddp.buckets), in_hooks=ddp.launched_in_hooks,
                per_step=comm.ledger.bytes_per_step("all_reduce"), grad_bytes=grad_bytes, n_params=len(ddp.params),
                unused_grad=None if model.unused is None else model.unused.weight.grad)


@pytest.mark.parametrize("world,kind,unused", [(2, "torch", False), (4, "torch", True), (2, "mpi", True)])
def test_ddp_matches_single_process_fp64(world, kind, unused):
    caps = 200 * 8 / 2**20  # ~200 float64 per bucket: several buckets
    results = run_distributed(_ddp_parity, world, unused, caps, comm=kind)
    ref = _reference(world, unused)
    for res in results:
        for name, value in ref.items():
            assert (res["state"][name] - value).abs().max().item() <= 1e-12, name
        assert res["unused_grad"] is None
    res = results[0]
    k = res["buckets"]
    assert k >= 2
    # overlap: per synced backward, at least k-1 bucket all-reduces launched from the gradient hooks (with
    # an unused parameter, from step 1 on: the rebuilt buckets put it last, in the observed ready order)
    assert res["in_hooks"] >= (STEPS - int(unused)) * (k - 1)
    # ledger: every gradient byte all-reduced once per step (step 0 also broadcasts the ready order),
    # plus, with find_unused_parameters, a float32 used-bitmap of one entry per parameter
    expected = res["grad_bytes"] + (4 * res["n_params"] if unused else 0)
    assert res["per_step"] == dict.fromkeys(range(STEPS), expected)


def _torch_ddp_side_by_side(comm):
    torch.manual_seed(0)
    ours, theirs = TiedMLP(), TiedMLP()
    theirs.load_state_dict(ours.state_dict())
    ddp_ours = DistributedDataParallel(ours, comm)
    ddp_theirs = torch.nn.parallel.DistributedDataParallel(theirs)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, theirs)]
    losses = {"ours": [], "theirs": []}
    for x, y in make_batches(4, comm.world_size, PER_RANK):
        x, y = shard(x, comm.rank, comm.world_size), shard(y, comm.rank, comm.world_size)
        for key, model, opt in (("ours", ddp_ours, opts[0]), ("theirs", ddp_theirs, opts[1])):
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
    return losses


def test_same_losses_as_torch_ddp():
    for losses in run_distributed(_torch_ddp_side_by_side, 2):
        assert losses["ours"] == pytest.approx(losses["theirs"], rel=1e-12, abs=0)


def _uneven(comm):
    torch.manual_seed(0)
    model = TiedMLP()
    ddp = DistributedDataParallel(model, comm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = make_batches(3, comm.world_size, PER_RANK)
    mine = batches if comm.rank == 0 else batches[:2]  # rank 1 runs out of data one step early
    with ddp.join():
        for x, y in mine:
            opt.zero_grad()
            F.mse_loss(ddp(shard(x, comm.rank, 2)), shard(y, comm.rank, 2)).backward()
            opt.step()
    return model.state_dict()


def test_join_handles_uneven_inputs():
    states = run_distributed(_uneven, 2)
    torch.manual_seed(0)
    model = TiedMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step, (x, y) in enumerate(make_batches(3, 2, PER_RANK)):
        opt.zero_grad()
        if step < 2:
            F.mse_loss(model(x), y).backward()
        else:  # only rank 0 had data: its gradient averaged with rank 1's zeros
            (F.mse_loss(model(shard(x, 0, 2)), shard(y, 0, 2)) / 2).backward()
        opt.step()
    for state in states:
        for name, value in model.state_dict().items():
            assert (state[name] - value).abs().max().item() <= 1e-12, name


def _mismatched(comm):
    model = TiedMLP(unused=comm.rank == 1)
    try:
        DistributedDataParallel(model, comm, find_unused_parameters=True)
    except ValueError as exc:
        return str(exc)
    return None


def test_mismatched_configs_between_ranks_raise_on_every_rank():
    for msg in run_distributed(_mismatched, 2):
        assert msg is not None and "mismatched configurations between ranks" in msg


def test_parameters_on_different_devices_are_rejected():
    model = TiedMLP()
    model.hidden.to("meta")
    with pytest.raises(ValueError, match="all parameters must be on one device"):
        DistributedDataParallel(model, comm=None)
