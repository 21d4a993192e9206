"""`python -m gpuforge train` under the real launchers (torchrun, mpiexec): parity with one process."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpuforge.parallel import train

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


TORCHRUN = [str(BIN / "torchrun"), "--nproc_per_node=2", "-m", "gpuforge", "train"]
MPIEXEC = [str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "gpuforge", "train"]


def _run(launcher, *args):
    return subprocess.run([*launcher, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize("launcher,strategy,comm", [
    (TORCHRUN, "ddp", "torch"),
    (MPIEXEC, "zero1", "mpi"),
])
def test_train_matches_single_process(launcher, strategy, comm):
    # torchrun's own parser rejects --nproc (an ambiguous abbreviation of its --nproc-per-node) anywhere on the
    # line; `python -m gpuforge train --nproc N` hands over to torchrun (test_fault_tolerance), mpiexec checks it
    nproc = ["--nproc", "2"] if comm == "mpi" else []
    proc = _run(launcher, "--model", "tinyllama", "--strategy", strategy, "--comm", comm, "--steps", "2", *nproc)
    assert proc.returncode == 0, proc.stderr[-4000:]
    diff = float(re.search(r"max \|param - single-process param\| = (\S+)", proc.stdout).group(1))
    assert diff <= 1e-12


def test_batch_not_divisible_by_world_size_is_an_error():
    proc = _run(TORCHRUN, "--strategy", "ddp",
                "--batch", "3", "--steps", "1")
    assert proc.returncode != 0
    assert "--batch 3 is not divisible by the world size 2" in proc.stderr


@pytest.mark.parametrize("model", ["tiny_convnext", "tiny_dit"])
def test_image_models_train_with_parity(model):
    proc = _run(TORCHRUN, "--model", model, "--strategy", "zero2", "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "parity ok" in proc.stdout


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_a_coupled_loss_trains_with_parity_through_its_gathered_form(strategy):
    """CLIP's contrastive loss couples the samples of a batch: `train` all-gathers the embeddings
    (gathered_loss.py), so it matches one process on the whole batch (ZeRO-3: the loss reads the root's
    temperature after forward)."""
    proc = _run(TORCHRUN, "--model", "tiny_clip", "--strategy", strategy, "--steps", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    diff = float(re.search(r"max \|param - single-process param\| = (\S+)", proc.stdout).group(1))
    assert diff <= 1e-12


def test_inference_only_models_are_not_offered():
    assert "int4_tiny_llama" not in train._trainable_models() and "tiny_clip" in train._trainable_models()


@pytest.mark.parametrize("strategy", ["tp", "pp"])
def test_model_parallel_strategies_match_single_process(strategy):
    proc = _run(TORCHRUN, "--strategy", strategy, "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    degrees = {"tp": "dp=1 tp=2 pp=1", "pp": "dp=1 tp=1 pp=2"}[strategy]
    assert f"strategy={strategy} {degrees} " in proc.stdout
    diff = float(re.search(r"parity ok: max \|loss - single-process loss\| = (\S+)", proc.stdout).group(1))
    assert diff <= 1e-12


@pytest.mark.parametrize("argv,message", [
    (["--strategy", "tp", "--ckpt-dir", "x"], "--ckpt-dir is for the data-parallel strategies, not 'tp'"),
    (["--save-every", "0"], "--save-every must be >= 1, got 0"),
    (["--strategy", "zero4"], "--strategy must be one of"),
])
def test_bad_options_are_errors_before_any_process_starts(argv, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main(argv)
