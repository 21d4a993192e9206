"""FullyShardedDataParallel (ZeRO-3) vs one process on the concatenated batch (fp64, 1e-12), its communication
ledger against 3(N−1)/N·Ψ·B, the parameter memory between steps, and bad input (tied parameters, devices,
dtypes, configurations that differ between ranks)."""

import re
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from gpuforge.parallel.data_parallel.fsdp import FullyShardedDataParallel
from tests.parallel.dist_harness import make_batches, run_distributed, shard

pytestmark = pytest.mark.distributed
STEPS, PER_RANK, CLIP, D = 3, 4, 0.05, 6


class Block(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.up, self.down = torch.nn.Linear(d, h, dtype=torch.float64), torch.nn.Linear(h, d, dtype=torch.float64)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(x)))


class Net(torch.nn.Module):
    """Two blocks, a frozen layer, a head, and a root-level parameter (the root unit's)."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(Block(D, 7), Block(D, 5))
        self.frozen = torch.nn.Linear(D, D, dtype=torch.float64).requires_grad_(False)
        self.head = torch.nn.Linear(D, D, dtype=torch.float64)
        self.scale = torch.nn.Parameter(torch.full((D,), 1.5, dtype=torch.float64))

    def forward(self, x):
        return self.head(self.frozen(self.blocks(x))) * self.scale


def _loss(model, x, y):
    """The root's `scale` is read again after forward (as TinyCLIP's loss reads its temperature): the root unit
    must still be whole then, and its gradient counted whichever order it arrives in."""
    return F.mse_loss(model(x), y) + 1e-2 * model.scale.square().sum()


def _build():
    torch.manual_seed(0)
    return Net()


def _reference(world):
    model = _build()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for x, y in make_batches(STEPS, world, PER_RANK):
        opt.zero_grad()
        _loss(model, x, y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
    return model.state_dict()


def _fsdp_parity(comm, auto_wrap):
    model = _build()
    fsdp = FullyShardedDataParallel(model, comm, auto_wrap=auto_wrap)
    opt = torch.optim.AdamW(fsdp.shard_parameters(), lr=0.05)
    comm.ledger.clear()
    between, prefetches = [], []
    for step, (x, y) in enumerate(make_batches(STEPS, comm.world_size, PER_RANK)):
        comm.ledger.step = step
        opt.zero_grad()
        before = fsdp.prefetches
        _loss(fsdp, shard(x, comm.rank, comm.world_size), shard(y, comm.rank, comm.world_size)).backward()
        fsdp.clip_grad_norm_(CLIP)
        opt.step()
        between.append(fsdp.memory(opt))
        prefetches.append(fsdp.prefetches - before)
    ledger = [(e.op, e.bytes) for e in comm.ledger.select(step=1)]
    wire = comm.ledger.wire_bytes(step=1)
    padded = sum(u.padded for u in fsdp.units)
    fsdp.gather_full_params()
    return dict(state={k: v.clone() for k, v in model.state_dict().items()}, ledger=ledger, wire=wire,
                padded=padded, units=[u.padded for u in fsdp.units], between=between, prefetches=prefetches,
                frozen=sum(p.numel() for p in model.parameters() if not p.requires_grad))


@pytest.mark.parametrize("world,kind,auto_wrap", [(2, "torch", None), (4, "torch", None),
                                                  (2, "torch", (Block, torch.nn.Linear)), (2, "mpi", None)])
def test_fsdp_matches_single_process_fp64(world, kind, auto_wrap):
    results = run_distributed(_fsdp_parity, world, auto_wrap, comm=kind)
    ref = _reference(world)
    for res in results:
        for name, value in ref.items():
            assert (res["state"][name] - value).abs().max().item() <= 1e-12, name
    res = results[0]
    b, psi_pad = 8, res["padded"]
    gathers = [n for op, n in res["ledger"] if op == "all_gather"]
    scatters = [n for op, n in res["ledger"] if op == "reduce_scatter"]
    assert sorted(gathers) == sorted(2 * [b * p for p in res["units"]])  # forward + backward, each unit
    assert sorted(scatters) == sorted(b * p for p in res["units"])
    assert [e for e in res["ledger"] if e[0] not in ("all_gather", "reduce_scatter")] == [("all_reduce", 8)]
    assert res["wire"] == Fraction(3 * (world - 1), world) * psi_pad * b + Fraction(2 * (world - 1), world) * 8
    # from the second step on, every unit but the first of each pass was prefetched, forward and backward
    assert res["prefetches"] == [0] + [2 * (len(res["units"]) - 1)] * (STEPS - 1)
    for mem in res["between"]:  # between steps: only the 1/N shards (plus the unsharded frozen layer)
        assert mem.params == b * psi_pad // world + b * res["frozen"]
        assert mem.grads == b * psi_pad // world
        assert mem.optimizer_state == 2 * b * psi_pad // world


def test_bad_input_is_rejected():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 3)
            self.b = torch.nn.Linear(3, 3)
            self.b.weight = self.a.weight

    with pytest.raises(ValueError, match="shared with a.weight"):
        FullyShardedDataParallel(Tied(), comm=None)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        FullyShardedDataParallel("net", comm=None)
    with pytest.raises(TypeError, match="auto_wrap must be"):
        FullyShardedDataParallel(Net(), comm=None, auto_wrap=["Block"])
    with pytest.raises(ValueError, match="no parameter requires grad"):
        FullyShardedDataParallel(torch.nn.Linear(2, 2).requires_grad_(False), comm=None)
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    mixed[1].bias.data = mixed[1].bias.data.double()
    with pytest.raises(TypeError, match="one dtype"):
        FullyShardedDataParallel(mixed, comm=None)
    split = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    with pytest.raises(ValueError, match="module: all parameters must be on one device"):
        FullyShardedDataParallel(split, comm=None)


def _mismatched_config(comm):
    model = _build() if comm.rank == 0 else torch.nn.Sequential(Block(D, 7), Block(D, 6))
    try:
        FullyShardedDataParallel(model, comm)
    except ValueError as exc:
        return str(exc)
    return None


def test_mismatched_configurations_raise_on_every_rank():
    for message in run_distributed(_mismatched_config, 2, comm_timeout=20):
        assert message is not None and "FullyShardedDataParallel: mismatched configurations between ranks" in message
        assert "units, numel, shapes differ" in message


def test_train_cli_zero3_matches_single_process():
    from tests.parallel.test_train_cli import TORCHRUN, _run

    proc = _run(TORCHRUN, "--model", "tinyllama", "--strategy", "zero3", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "strategy=zero3" in proc.stdout
    diff = float(re.search(r"max \|param - single-process param\| = (\S+)", proc.stdout).group(1))
    assert diff <= 1e-12
