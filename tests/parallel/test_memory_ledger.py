"""The memory ledger of each strategy against the ZeRO formula for mixed-precision (bf16) Adam, per rank:
DDP 16Ψ, ZeRO-1 4Ψ + 12Ψ/N, ZeRO-2 2Ψ + 14Ψ/N, ZeRO-3 16Ψ/N — exactly when N divides every flat buffer,
within the padding otherwise; and what CPU offload moves to the host."""

import pytest
import torch
import torch.nn.functional as F

from gpuforge.parallel.comm.ledger import zero_formula_bytes
from gpuforge.parallel.data_parallel.ddp import DistributedDataParallel
from gpuforge.parallel.data_parallel.fsdp import FullyShardedDataParallel
from gpuforge.parallel.data_parallel.mixed_precision import MixedPrecision, MixedPrecisionOptimizer
from gpuforge.parallel.data_parallel.zero import ZeroRedundancyOptimizer
from tests.parallel.dist_harness import run_distributed

pytestmark = pytest.mark.distributed
D, BF16 = 8, torch.bfloat16


class Net(torch.nn.Module):
    """Two 72-parameter blocks and an 8-parameter root scale (+ `extra` more): Ψ = 152 + extra."""

    def __init__(self, extra: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.Sequential(torch.nn.Linear(D, D), torch.nn.Linear(D, D))
        self.scale = torch.nn.Parameter(torch.ones(D + extra))

    def forward(self, x):
        return self.blocks(x) * self.scale[:D]


def _batch(comm, dtype):
    g = torch.Generator().manual_seed(comm.rank)
    return torch.randn(4, D, generator=g).to(dtype), torch.randn(4, D, generator=g).to(dtype)


def _train(model, opt, comm, measure, dtype=BF16):
    """Two steps (Adam's state exists from the first); returns `measure()` taken during the second."""
    x, y = _batch(comm, dtype)
    for step in range(2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if step == 1:
            memory = measure()
        opt.step()
    return memory


def _ledgers(comm):
    mp, adamw = MixedPrecision(param_dtype=BF16), torch.optim.AdamW
    out = {}
    ddp = DistributedDataParallel(Net().to(BF16), comm)
    opt = MixedPrecisionOptimizer(ddp.parameters(), adamw, lr=1e-3)
    out[0] = _train(ddp, opt, comm, lambda: ddp.memory(opt))  # after backward: the buckets hold the gradients
    for stage in (1, 2):
        model = Net().to(BF16)
        zero = ZeroRedundancyOptimizer(model.parameters(), adamw, comm, zero_stage=stage, mixed_precision=mp, lr=1e-3)
        out[stage] = _train(model, zero, comm, lambda z=zero: (z.reduce_gradients(), z.memory())[1])
    fsdp = FullyShardedDataParallel(Net(), comm, mixed_precision=mp)
    opt = torch.optim.AdamW(fsdp.shard_parameters(), lr=1e-3)
    out[3] = _train(fsdp, opt, comm, lambda: fsdp.memory(opt))  # after backward: shard gradients, no full params
    model = Net().to(BF16)
    zero = ZeroRedundancyOptimizer(model.parameters(), adamw, comm, zero_stage=2, mixed_precision=mp, offload="cpu")
    out["offload"] = _train(model, zero, comm, lambda: (zero.reduce_gradients(), zero.memory())[1])
    model = Net(extra=3).to(BF16)
    zero = ZeroRedundancyOptimizer(model.parameters(), adamw, comm, zero_stage=1, mixed_precision=mp)
    out["padded"] = _train(model, zero, comm, lambda: (zero.reduce_gradients(), zero.memory())[1])
    return out


@pytest.mark.parametrize("world", [2, 4])
def test_memory_matches_zero_formula(world):
    psi = 152  # divisible by 2 and 4, and so is every FSDP unit (72, 72, 8): no padding
    for ledgers in run_distributed(_ledgers, world):
        for stage in (0, 1, 2, 3):
            assert ledgers[stage].total == zero_formula_bytes(psi, world, stage), (stage, ledgers[stage])
            assert ledgers[stage].offloaded == 0
        one, two = ledgers[1], ledgers[2]  # the paper's split: bf16 params and grads, fp32 master + 2 moments
        assert (one.params, one.grads, one.master, one.optimizer_state) == (2 * psi, 2 * psi, 4 * psi // world,
                                                                            8 * psi // world)
        assert (two.params, two.grads) == (2 * psi, 2 * psi // world)
        off = ledgers["offload"]  # master and Adam state on the host: 12Ψ/N leaves the device
        assert (off.total, off.offloaded) == (2 * psi + 2 * psi // world, 12 * psi // world)
        padded, psi_pad = ledgers["padded"], -(-(psi + 3) // world) * world
        # the gradient buffer and the shards are padded to a multiple of N; the parameters are not
        assert padded.total - zero_formula_bytes(psi + 3, world, 1) == 2 * (psi_pad - psi - 3) * (1 + 6 / world)
