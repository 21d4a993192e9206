"""FullyShardedDataParallel with CPU offload, world size 2 on gloo and on MPI: the shards, their gradients and
AdamW's state live on the host (on this CPU machine the test checks the mechanism: where each tensor lives,
that every all-gather copies the shard over and every reduced gradient comes back, the memory ledger), and
training equals one process in float64 over 20 steps (1e-12), as without offload."""

import pytest
import torch

from gpuforge.parallel.data_parallel.fsdp import FullyShardedDataParallel
from tests.parallel.dist_harness import make_batches, run_distributed, shard
from tests.parallel.test_fsdp import CLIP, PER_RANK, _build, _loss

pytestmark = pytest.mark.distributed
STEPS = 20


def _offloaded(comm):
    model = _build()
    fsdp = FullyShardedDataParallel(model, comm, offload="cpu")
    opt = torch.optim.AdamW(fsdp.shard_parameters(), lr=0.05)
    for x, y in make_batches(STEPS, comm.world_size, PER_RANK):
        opt.zero_grad()
        _loss(fsdp, shard(x, comm.rank, comm.world_size), shard(y, comm.rank, comm.world_size)).backward()
        fsdp.clip_grad_norm_(CLIP)
        opt.step()
    memory = fsdp.memory(opt)
    devices = {"shards": {s.device.type for s in fsdp.shards}, "grads": {s.grad.device.type for s in fsdp.shards},
               "state": {v.device.type for st in opt.state.values() for v in st.values() if v.dim()}}
    shard_bytes = sum(s.numel() * s.element_size() for s in fsdp.shards)
    traffic = dict(fsdp.host_traffic)
    fsdp.gather_full_params()
    return dict(state={k: v.clone() for k, v in model.state_dict().items()}, memory=memory, devices=devices,
                traffic=traffic, shard_bytes=shard_bytes, n_units=len(fsdp.units))


def _reference(world):
    model = _build()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for x, y in make_batches(STEPS, world, PER_RANK):
        opt.zero_grad()
        _loss(model, x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return model.state_dict()


@pytest.mark.parametrize("kind", ["torch", "mpi"])
def test_offloaded_fsdp_matches_single_process_and_lives_on_the_host(kind):
    ref = _reference(2)
    for res in run_distributed(_offloaded, 2, comm=kind):
        for name, value in ref.items():
            assert (res["state"][name] - value).abs().max().item() <= 1e-12, name
        assert res["devices"] == {"shards": {"cpu"}, "grads": {"cpu"}, "state": {"cpu"}}
        # forward and backward gather every unit: the shard goes to the device twice a step, its reduced
        # gradient comes back once
        assert res["traffic"] == {"to_device": 2 * STEPS * res["shard_bytes"], "to_host": STEPS * res["shard_bytes"]}
        mem = res["memory"]  # between steps nothing of the trained state stays on the device
        assert mem.offloaded == res["shard_bytes"] * (1 + 1 + 2)  # shard, gradient, two AdamW moments
        assert mem.grads == mem.optimizer_state == mem.master == 0


def test_offload_must_be_cpu():
    with pytest.raises(ValueError, match="offload must be None or 'cpu', got 'nvme'"):
        FullyShardedDataParallel(_build(), None, offload="nvme")
