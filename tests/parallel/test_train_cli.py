"""`python -m gpuforge train` under the real launchers (torchrun, mpiexec): parity with one process."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpuforge.parallel.training import cli as train

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# torch.distributed.run under this interpreter (the venv's `torchrun` script may name another one)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", "gpuforge", "train"]
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
    (parallel/training/gathered_loss.py), so it matches one process on the whole batch (ZeRO-3: the loss reads
    the root's temperature after forward)."""
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


@pytest.mark.parametrize("launcher,argv,degrees", [
    (TORCHRUN, ["--cp", "2"], "strategy=cp dp=1 cp=2 ep=1 attention=ring"),
    (MPIEXEC, ["--ep", "2", "--comm", "mpi"], "strategy=ep dp=2 cp=1 ep=2"),
])
def test_cp_and_ep_match_single_process(launcher, argv, degrees):
    proc = _run(launcher, *argv, "--steps", "2", "--seq-len", "16", "--batch", "2", "--n-layers", "1")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert degrees in proc.stdout
    diff = float(re.search(r"parity ok: max \|loss - single-process loss\| = (\S+)", proc.stdout).group(1))
    assert diff <= 1e-12


def test_tinymoe_pipeline_with_experts_over_ep_matches_single_process_on_mpi():
    """--strategy pp --ep 2 on 4 MPI ranks: the TinyMoE in 2 stages of ZB-H1 (the balance losses in each
    stage's split backward), each over dp 2 sharing its experts, every block checkpointed: the same losses as
    one process."""
    proc = _run([str(BIN / "mpiexec"), "-n", "4", *MPIEXEC[3:]], "--strategy", "pp", "--ep", "2", "--comm", "mpi",
                "--schedule", "zb1p", "--checkpoint-activations", "full", "--steps", "2", "--seq-len", "16",
                "--batch", "4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "strategy=pp model=tinymoe dp=2 pp=2 ep=2 schedule=zb1p" in proc.stdout
    assert "checkpoint_activations=full" in proc.stdout
    diff = float(re.search(r"parity ok: max \|loss - single-process loss\| = (\S+)", proc.stdout).group(1))
    assert diff <= 1e-12


def test_4d_on_eight_mpi_ranks_matches_single_process():
    """dp × tp × pp × cp = 1 × 2 × 2 × 2 under mpiexec -n 8: TP all-reduces, pipeline sends and ring attention all
    on MPI; 2 steps equal one process."""
    proc = _run([str(BIN / "mpiexec"), "-n", "8", *MPIEXEC[3:]], "--strategy", "3d", "--tp", "2", "--pp", "2",
                "--cp", "2", "--comm", "mpi", "--steps", "2", "--seq-len", "16", "--batch", "4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "strategy=3d dp=1 tp=2 pp=2 cp=2 " in proc.stdout
    diff = float(re.search(r"parity ok: max \|loss - single-process loss\| = (\S+)", proc.stdout).group(1))
    assert diff <= 1e-12


def test_cp_and_ep_configurations_that_cannot_run_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--cp", "2", "--ep", "2"])
    assert exit_info.value.code == 2 and "--cp and --ep together" in capsys.readouterr().err
    with pytest.raises(SystemExit, match=r"--strategy ep: ep \(3\) must divide dp \(1\)"):
        train.main(["--ep", "3"])


@pytest.mark.parametrize("argv,message", [
    (["--schedule", "1f1b", "--virtual-stages", "2"], "--virtual-stages is for --schedule interleaved"),
    (["--cp", "2", "--ckpt-dir", "x"], "--ckpt-dir is for the data-parallel and tp/pp/3d strategies"),
    (["--strategy", "zero2", "--cp", "2"], "--cp is for --strategy cp, tp, pp or 3d, not 'zero2'"),
    (["--strategy", "ddp", "--ep", "2"], "--ep is for --strategy ep, pp or 3d, not 'ddp'"),
    (["--strategy", "pp", "--schedule", "zb1p", "--checkpoint-activations", "selective"],
     "--schedule zb1p runs two backward passes over each block (B, then W)"),
    (["--strategy", "3d", "--ep", "2", "--tp", "2"], "--ep with --strategy pp/3d trains the TinyMoE over dp × pp × ep"),
    (["--ep", "2", "--checkpoint-activations"], "--checkpoint-activations is for the data-parallel and tp/pp/3d"),
    (["--checkpoint-activations", "some"], "argument --checkpoint-activations: invalid choice: 'some'"),
    (["--save-every", "0"], "argument --save-every: expected a positive integer, got 0"),
    (["--strategy", "zero4"], "argument --strategy: invalid choice: 'zero4'"),
    (["--stpes", "1"], "unrecognized arguments: --stpes 1"),
    (["--steps", "-1"], "argument --steps: expected a positive integer, got -1"),
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--clip", "-1"], "argument --clip: expected a positive finite number, got -1"),
    (["--lr", "nan"], "argument --lr: expected a positive finite number, got nan"),
    (["--nproc", "0"], "argument --nproc: expected a positive integer, got 0"),
    (["--batch", "0"], "argument --batch: expected a positive integer, got 0"),
    (["--seq-len", "0"], "argument --seq-len: expected a positive integer, got 0"),
    (["--device", "cuda"], "argument --device: invalid choice: 'cuda'"),
    (["--ckpt-dir", f"{__file__}/ckpt"], f"--ckpt-dir {__file__}/ckpt: not a writable directory"),
])
def test_bad_options_are_errors_before_any_process_starts(argv, message, capsys):
    """argparse's own validation: exit status 2 and a one-line message naming the option, no traceback."""
    if argv == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("cuda is a valid --device on a machine with a GPU")
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_pipeline_checkpoint_resumes_under_another_schedule(tmp_path):
    """tp/pp/3d --ckpt-dir: 2 steps of interleaved 1F1B (world size 2, gloo), then the same directory resumed
    for 4 steps under ZB-H1 with activation checkpointing: the losses equal one uninterrupted process."""
    common = ["--strategy", "pp", "--n-layers", "4", "--ckpt-dir", str(tmp_path), "--save-every", "1"]
    first = _run(TORCHRUN, *common, "--schedule", "interleaved", "--steps", "2")
    assert first.returncode == 0, first.stderr[-4000:]
    assert (tmp_path / "latest").read_text().strip() == "step-00000002"
    second = _run(TORCHRUN, *common, "--schedule", "zb1p", "--checkpoint-activations", "--steps", "4")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stdout and "after step 2" in second.stdout
    diff = float(re.search(r"parity ok: max \|loss - single-process loss\| = (\S+)", second.stdout).group(1))
    assert diff <= 1e-12


def test_context_parallel_3d_checkpoint_resumes_under_another_layout(tmp_path):
    """--strategy 3d --cp 2 (Trainer3D with ring attention over 2 processes, ZeRO-1 over cp; both cp ranks
    hold the part, one writes it) for 2 steps, then the same directory resumed for 2 more as a 2-stage
    pipeline: the losses equal one uninterrupted process."""
    common = ["--ckpt-dir", str(tmp_path), "--save-every", "1", "--seq-len", "16", "--batch", "4"]
    first = _run(TORCHRUN, "--strategy", "3d", "--cp", "2", *common, "--steps", "2")
    assert first.returncode == 0, first.stderr[-4000:]
    assert "strategy=3d dp=1 tp=1 pp=1 cp=2 " in first.stdout
    second = _run(TORCHRUN, "--strategy", "pp", *common, "--steps", "4")
    assert second.returncode == 0, second.stderr[-4000:]
    assert "resumed from" in second.stdout and "after step 2" in second.stdout
    diff = float(re.search(r"parity ok: max \|loss - single-process loss\| = (\S+)", second.stdout).group(1))
    assert diff <= 1e-12


def test_a_schedule_the_layers_cannot_fill_fails_on_every_rank():
    proc = _run(TORCHRUN, "--strategy", "pp", "--schedule", "interleaved", "--n-layers", "3", "--steps", "1")
    assert proc.returncode != 0
    message = "n_layers (3) must be divisible by pp · virtual stages = 2 · 2"
    assert proc.stderr.count(message) == 2, proc.stderr[-3000:]  # both ranks, before any process group
