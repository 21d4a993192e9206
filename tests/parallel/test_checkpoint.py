"""Sharded ZeRO checkpoints: saved at world size 2 / stage 1, resumed at world size 3 / stage 2;
the resumed run ends with the same parameters as an uninterrupted one (fp64, 1e-12)."""

import pytest
import torch
import torch.nn.functional as F

from gpuforge.parallel.checkpoint import load_sharded, save_sharded
from gpuforge.parallel.zero import ZeroRedundancyOptimizer
from tests.parallel.dist_harness import TiedMLP, make_batches, run_distributed, shard

pytestmark = pytest.mark.distributed
GLOBAL_ROWS, STEPS, SAVE_AT = 12, 4, 2


def _run(comm, path, stage, first, last, resume):
    torch.manual_seed(0)
    model = TiedMLP()
    opt = ZeroRedundancyOptimizer(model.parameters(), torch.optim.AdamW, comm, stage=stage, lr=0.05)
    if resume:
        assert load_sharded(path, model, opt) == first
    per_rank = GLOBAL_ROWS // comm.world_size
    batches = make_batches(STEPS, 1, GLOBAL_ROWS)
    for x, y in batches[first:last]:
        opt.zero_grad()
        F.mse_loss(model(shard(x, comm.rank, comm.world_size)), shard(y, comm.rank, comm.world_size)).backward()
        opt.step()
    assert per_rank * comm.world_size == GLOBAL_ROWS
    if not resume:
        save_sharded(path, model, opt, comm, step=last)
    return model.state_dict()


def test_resume_at_another_world_size_and_stage(tmp_path):
    path = str(tmp_path / "ckpt")
    run_distributed(_run, 2, path, 1, 0, SAVE_AT, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    resumed = run_distributed(_run, 3, path, 2, SAVE_AT, STEPS, True)
    torch.manual_seed(0)
    model = TiedMLP()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    for x, y in make_batches(STEPS, 1, GLOBAL_ROWS):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    for state in resumed:
        for name, value in model.state_dict().items():
            assert (state[name] - value).abs().max().item() <= 1e-12, name


def test_directory_without_metadata_is_not_a_checkpoint(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        load_sharded(tmp_path, TiedMLP(), None)
