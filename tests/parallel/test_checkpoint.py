"""Sharded checkpoints of DDP, ZeRO-1, ZeRO-2 and ZeRO-3 (fp64, TinyMLP, the `gpuforge train` loop), on gloo
and on MPI.

- Resumed at the same world size and layout, the next losses and the final parameters are those of the
  uninterrupted run exactly (bit for bit).
- Saved at world size 2 and resumed at world size 3 in another layout (ddp -> zero1 -> zero2 -> zero3 -> ddp),
  the final parameters match the uninterrupted run to 1e-12.
"""

import json
from types import SimpleNamespace

import pytest
import torch

from gpuforge.parallel.checkpoint.sharded import latest_checkpoint, load_checkpoint, save_checkpoint
from gpuforge.parallel.data_parallel.ddp import DistributedDataParallel
from gpuforge.parallel.data_parallel.zero import ZeroRedundancyOptimizer
from gpuforge.parallel.training import cli as train
from tests.parallel.dist_harness import TiedMLP, make_batches, run_distributed, shard

pytestmark = pytest.mark.distributed
STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
ARGS = SimpleNamespace(lr=0.01, clip=0.5, steps=4, batch=12, save_every=2, dtype="float64")
SAVED_STEP = 2


def build_strategy(strategy, comm):
    """(reference model, model, trainer) of TinyMLP in float64 as `gpuforge train` builds them."""
    ref = train.reference_model("tiny_mlp")
    model, trainer = train.data_parallel_trainer(ref, strategy, comm, ARGS)
    return ref, model, trainer


def _params(model, trainer):
    trainer.gather_full_params()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _uninterrupted(comm, root):
    """Train every strategy 4 steps from scratch, checkpointing after steps 2 and 4."""
    out = {}
    for strategy in STRATEGIES:
        ref, model, trainer = build_strategy(strategy, comm)

        def save(step, losses, trainer=trainer, strategy=strategy):
            save_checkpoint(f"{root}/{strategy}", step, trainer.forward, trainer.optimizer, comm,
                            extra={"losses": losses})
        losses = train.train_steps(ref, trainer, comm, ARGS, save=save)
        out[strategy] = (losses, _params(model, trainer))
    return out


def _resumed(comm, root, layouts):
    """Load each strategy's step-2 checkpoint into layouts[strategy] and train steps 3 and 4."""
    out = {}
    for saved, strategy in layouts.items():
        ref, model, trainer = build_strategy(strategy, comm)
        meta = load_checkpoint(f"{root}/{saved}/step-{SAVED_STEP:08d}", trainer.forward, trainer.optimizer, comm)
        assert meta["step"] == SAVED_STEP == len(meta["extra"]["losses"])
        losses = train.train_steps(ref, trainer, comm, ARGS, losses=meta["extra"]["losses"])
        out[saved] = (losses, _params(model, trainer))
    return out


@pytest.fixture(scope="module", params=["torch", "mpi"])
def saved(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"ckpt-{request.param}")
    return root, request.param, run_distributed(_uninterrupted, 2, str(root), comm=request.param)


def test_layout_on_disk(saved):
    root, _, _ = saved
    ddp = root / "ddp"
    assert sorted(p.name for p in ddp.iterdir()) == ["latest", "step-00000002", "step-00000004"]
    assert latest_checkpoint(ddp) == ddp / "step-00000004"
    assert sorted(p.name for p in (ddp / "step-00000002").iterdir()) == [
        "metadata.json", "rank0.pt", "shard-0.pt", "shard-1.pt"]
    meta = json.loads((root / "zero3" / "step-00000002" / "metadata.json").read_text())
    assert (meta["step"], meta["world_size"], meta["layout"]) == (2, 2, "fsdp")
    assert len(meta["groups"]) == 3  # one per FSDP unit: the three Linear layers


def test_resume_gives_the_same_next_losses_exactly(saved):
    root, comm, uninterrupted = saved
    resumed = run_distributed(_resumed, 2, str(root), {s: s for s in STRATEGIES}, comm=comm)
    for rank in range(2):
        for strategy in STRATEGIES:
            full_losses, full_params = uninterrupted[rank][strategy]
            losses, params = resumed[rank][strategy]
            assert losses[SAVED_STEP:] == full_losses[SAVED_STEP:], (strategy, rank)
            if rank == 0:  # the losses before the checkpoint come back from it (rank 0's)
                assert losses == full_losses, strategy
            for name, value in full_params.items():
                assert torch.equal(params[name], value), (strategy, rank, name)


def test_resume_at_another_world_size_and_layout(saved):
    root, comm, uninterrupted = saved
    layouts = dict(zip(STRATEGIES, STRATEGIES[1:] + STRATEGIES[:1], strict=True))
    resumed = run_distributed(_resumed, 3, str(root), layouts, comm=comm)
    for saved_as in STRATEGIES:
        _, full_params = uninterrupted[0][saved_as]
        for rank in range(3):
            _, params = resumed[rank][saved_as]
            for name, value in full_params.items():
                assert (params[name] - value).abs().max().item() <= 1e-12, (saved_as, layouts[saved_as], name)


def _step(model, opt, x, y, comm):
    opt.zero_grad()
    mine = (shard(x, comm.rank, comm.world_size), shard(y, comm.rank, comm.world_size))
    torch.nn.functional.mse_loss(model(mine[0]), mine[1]).backward()
    opt.step()


def _tied_frozen_and_a_buffer(comm, root):
    """DDP with AdamW over ALL parameters (frozen ones included) of a model with a tied weight, a frozen layer and
    a buffer: two steps, save; a differently initialised ZeRO-2 copy loads it; both take step 3."""
    batches = make_batches(3, comm.world_size, 2)
    torch.manual_seed(0)
    model = TiedMLP()
    model.register_buffer("calls", torch.tensor(7.0, dtype=torch.float64))
    ddp = DistributedDataParallel(model, comm)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for x, y in batches[:2]:
        _step(ddp, opt, x, y, comm)
    save_checkpoint(root, 2, ddp, opt, comm)
    torch.manual_seed(1)
    other = TiedMLP()
    other.register_buffer("calls", torch.tensor(0.0, dtype=torch.float64))
    zero = ZeroRedundancyOptimizer(other.parameters(), torch.optim.AdamW, comm, zero_stage=2, lr=0.05)
    load_checkpoint(latest_checkpoint(root), other, zero, comm)
    for m, o in ((ddp, opt), (other, zero)):
        _step(m, o, *batches[2], comm)
    return model.state_dict(), other.state_dict()


def test_tied_and_frozen_parameters_and_buffers_survive_a_change_of_layout(tmp_path):
    for ddp_state, zero_state in run_distributed(_tied_frozen_and_a_buffer, 2, str(tmp_path)):
        assert ddp_state.keys() == zero_state.keys()
        assert zero_state["calls"].item() == 7.0
        for name, value in ddp_state.items():
            assert (zero_state[name] - value).abs().max().item() <= 1e-12, name


def test_directory_without_metadata_is_not_a_checkpoint(tmp_path):
    (tmp_path / "shard-0.pt").write_bytes(b"")
    model = torch.nn.Linear(2, 2)
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        load_checkpoint(tmp_path, model, torch.optim.AdamW(model.parameters()))


def test_no_checkpoint_yet(tmp_path):
    assert latest_checkpoint(tmp_path) is None
