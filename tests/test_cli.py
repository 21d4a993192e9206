"""`python -m gpuforge`: user errors are one-line messages with a non-zero status, never tracebacks."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _gpuforge(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "gpuforge", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_check_names_an_unknown_op():
    proc = _gpuforge("check", "frobnicate")
    assert proc.returncode == 2
    assert "unknown op(s) frobnicate; expected among" in proc.stderr and "Traceback" not in proc.stderr


def test_unknown_command():
    proc = _gpuforge("frobnicate")
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr


def test_train_without_a_launcher_runs_one_process():
    """No torchrun, no --nproc: a world of one, still compared with the single-process reference."""
    proc = _gpuforge("train", "--model", "tiny_mlp", "--strategy", "zero2", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "world=1" in proc.stdout and "parity ok" in proc.stdout


def test_resuming_with_another_model_is_a_friendly_error(tmp_path):
    """A checkpoint directory of one model, resumed with another: the saved configuration is compared before
    anything is loaded, and the message says what differs (not the loader's traceback)."""
    ckpt = tmp_path / "ckpt"
    first = _gpuforge("train", "--model", "tiny_mlp", "--steps", "1", "--ckpt-dir", str(ckpt))
    assert first.returncode == 0, first.stderr[-3000:]
    second = _gpuforge("train", "--model", "tiny_vae", "--steps", "2", "--ckpt-dir", str(ckpt))
    assert second.returncode != 0
    assert "was saved by a run with" in second.stderr and "'model': 'tiny_mlp'" in second.stderr
    assert "Traceback" not in second.stderr, second.stderr[-3000:]
