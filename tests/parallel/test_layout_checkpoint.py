"""Layout-free checkpoints: saved under tp=2, pp=2 on 4 gloo processes, resumed under other layouts (dp=4
ZeRO-1, dp=2 pp=2, tp=4, and one process), training continues with the uninterrupted run's losses (float64)."""

import json

import pytest
import torch

from gpuforge.models.vol2_llm import TinyLlama, lm_loss, make_batch
from gpuforge.parallel.checkpoint.layout import load_full_model, load_layout_checkpoint, save_layout_checkpoint
from gpuforge.parallel.checkpoint.sharded import latest_checkpoint
from gpuforge.parallel.model_parallel.mesh import DeviceMesh
from gpuforge.parallel.training.trainer_3d import Trainer3D, single_process_losses
from tests.parallel.dist_harness import run_distributed
from tests.parallel.test_tensor_parallel import S, tiny_config

B, LR, MAX_NORM = 8, 1e-2, 0.05
BEFORE, AFTER = 3, 3  # steps before the checkpoint, steps after it
RESUME_LAYOUTS = [(4, 1, 1), (2, 1, 2), (1, 4, 1)]  # (dp, tp, pp)


def _trainer(comm, dp, tp, pp):
    torch.manual_seed(0)
    model = TinyLlama(tiny_config()).double()
    return Trainer3D(model, DeviceMesh(comm, dp=dp, tp=tp, pp=pp), num_microbatches=2, lr=LR)


def _losses(comm, trainer, steps):
    """The global losses of `steps` (on every rank: the last stage's, shared through a max-reduce)."""
    out = []
    for step in steps:
        loss, _ = trainer.step(make_batch(step, B, S), MAX_NORM)
        value = torch.tensor([float("-inf") if loss is None else loss], dtype=torch.float64)
        comm.all_reduce(value, op="max")
        out.append(value.item())
    return out


def save_then_resume(comm, root):
    saver = _trainer(comm, 1, 2, 2)
    _losses(comm, saver, range(BEFORE))
    path = save_layout_checkpoint(root, saver, BEFORE)
    assert path == latest_checkpoint(root)
    resumed = {}
    for dp, tp, pp in RESUME_LAYOUTS:
        trainer = _trainer(comm, dp, tp, pp)
        assert load_layout_checkpoint(path, trainer) == BEFORE
        resumed[(dp, tp, pp)] = _losses(comm, trainer, range(BEFORE, BEFORE + AFTER))
    return resumed


@pytest.mark.distributed
def test_checkpoint_from_tp2_pp2_resumes_under_other_layouts(tmp_path):
    results = run_distributed(save_then_resume, 4, str(tmp_path))
    path = latest_checkpoint(tmp_path)
    uninterrupted = single_process_losses(steps=BEFORE + AFTER, batch_size=B, seq_len=S, lr=LR, max_norm=MAX_NORM,
                                          config=tiny_config(), dtype=torch.float64)[BEFORE:]
    meta = json.loads((path / "metadata.json").read_text())
    assert meta["step"] == BEFORE and meta["layout"] == {"dp": 1, "tp": 2, "pp": 2, "cp": 1}
    assert sorted(p.name for p in path.iterdir()) == ["metadata.json", "part-0.pt", "part-1.pt"]  # one per stage
    for layout, losses in results[0].items():
        diff = max(abs(a - b) / b for a, b in zip(losses, uninterrupted, strict=True))
        assert diff < 1e-12, (layout, losses, uninterrupted)

    torch.manual_seed(1)  # other initial weights: everything must come from the checkpoint
    model = TinyLlama(tiny_config()).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    assert load_full_model(path, model, optimizer) == BEFORE
    single = []
    for step in range(BEFORE, BEFORE + AFTER):
        x, y = make_batch(step, B, S)
        loss = lm_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM)
        optimizer.step()
        optimizer.zero_grad()
        single.append(loss.item())
    assert max(abs(a - b) / b for a, b in zip(single, uninterrupted, strict=True)) < 1e-12, (single, uninterrupted)


def test_incomplete_or_foreign_checkpoints_are_rejected(tmp_path):
    model = TinyLlama(tiny_config()).double()
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(FileNotFoundError, match="no metadata.json"):
        load_full_model(tmp_path, model, optimizer)
    (tmp_path / "metadata.json").write_text(json.dumps({"format": "zero-sharded"}))
    with pytest.raises(ValueError, match="metadata.json: format 'zero-sharded'"):
        load_full_model(tmp_path, model, optimizer)
