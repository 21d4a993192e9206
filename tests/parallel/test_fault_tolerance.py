"""Kills with SIGKILL (parallel/checkpoint/faults.py), never mocks.

- During a save, at each step of the protocol: the latest checkpoint afterwards is the previous one, byte for
  byte, and loads (the new one, once `latest` names it).
- During training under `torchrun --max-restarts 1`: the group restarts, resumes from the last checkpoint and
  ends with exactly the parameters and losses of a run without failure (fp64).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from gpuforge.parallel.checkpoint.sharded import latest_checkpoint, load_checkpoint, save_checkpoint
from gpuforge.parallel.training import cli as train
from tests.parallel.dist_harness import ROOT, run_distributed
from tests.parallel.test_checkpoint import ARGS, build_strategy

pytestmark = pytest.mark.distributed


def _digest(directory: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def _steps(n):
    return SimpleNamespace(**{**vars(ARGS), "steps": n})


def _save_then_die_saving(comm, root, point, rank, marker):
    """ZeRO-2: one step, checkpoint 1 (rank 0 records its files' digests), one step, checkpoint 2 with a
    kill at `point` on `rank`."""
    ref, _, trainer = build_strategy("zero2", comm)
    fwd, opt = trainer.forward, trainer.optimizer
    losses = train.train_steps(ref, trainer, comm, _steps(1))
    good = save_checkpoint(root, 1, fwd, opt, comm, extra={"losses": losses})
    if comm.rank == 0:
        (Path(root).parent / "good.json").write_text(json.dumps(_digest(good)))
    os.environ.update(GPUFORGE_FAIL_AT=f"{point}@{rank}", GPUFORGE_FAIL_ONCE=marker)
    losses = train.train_steps(ref, trainer, comm, _steps(2), losses=losses)
    save_checkpoint(root, 2, fwd, opt, comm, extra={"losses": losses})


@pytest.mark.parametrize("point,rank,survivor", [
    ("ckpt-files-written", 1, 1),   # rank 1's shard written, rank 0's maybe not, no metadata
    ("ckpt-before-metadata", 0, 1),
    ("ckpt-before-rename", 0, 1),   # complete, metadata.json included, still under .tmp
    ("ckpt-before-latest", 0, 1),   # renamed into place, not published
    ("ckpt-before-prune", 0, 2),    # published: the new one is the latest
])
def test_kill_during_save_keeps_a_complete_latest_checkpoint(tmp_path, point, rank, survivor):
    root, marker = tmp_path / "ckpt", tmp_path / "killed"
    with pytest.raises((ProcessExitedException, ProcessRaisedException)):
        run_distributed(_save_then_die_saving, 2, str(root), point, rank, str(marker))
    assert marker.exists(), "the kill point was never reached"
    latest = latest_checkpoint(root)
    assert latest == root / f"step-{survivor:08d}"
    if survivor == 1:
        assert _digest(latest) == json.loads((tmp_path / "good.json").read_text())
    model = train.reference_model("tiny_mlp").build().to(torch.float64)
    meta = load_checkpoint(latest, model, torch.optim.AdamW(model.parameters()))  # into one plain process
    assert meta["step"] == survivor == len(meta["extra"]["losses"])


def _gpuforge_train(prefix, ckpt_dir, *extra, env=None):
    args = ["--model", "tiny_mlp", "--strategy", "zero3", "--steps", "6", "--save-every", "2",
            "--ckpt-dir", str(ckpt_dir), *extra]
    proc = subprocess.run([sys.executable, *prefix, "-m", "gpuforge", "train", *args], cwd=ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "parity ok" in proc.stdout
    return proc


def _final_state(ckpt_dir):
    model = train.reference_model("tiny_mlp").build().to(torch.float64)
    meta = load_checkpoint(latest_checkpoint(ckpt_dir), model, torch.optim.AdamW(model.parameters()))
    return meta, dict(model.named_parameters())


def test_torchrun_restarts_a_killed_rank_and_finishes_as_without_failure(tmp_path):
    marker = tmp_path / "killed"
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--max-restarts", "1"]
    failed = _gpuforge_train(torchrun, tmp_path / "failed",
                             env={"GPUFORGE_FAIL_AT": "step-3@1", "GPUFORGE_FAIL_ONCE": str(marker),
                                  "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"})  # see parallel/training/cli.py
    assert marker.exists(), "rank 1 was never killed"
    assert f"resumed from {tmp_path / 'failed' / 'step-00000002'} after step 2" in failed.stdout
    _gpuforge_train([], tmp_path / "clean", "--nproc", "2")  # outside a launcher: gpuforge hands over to torchrun
    failed_meta, failed_params = _final_state(tmp_path / "failed")
    clean_meta, clean_params = _final_state(tmp_path / "clean")
    assert failed_meta["step"] == clean_meta["step"] == 6
    assert failed_meta["extra"]["losses"] == clean_meta["extra"]["losses"]
    for name, value in clean_params.items():
        assert torch.equal(failed_params[name], value), name
