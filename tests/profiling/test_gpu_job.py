"""scripts/gpu_job.sh fails loudly: an install error stops the job with the log's tail (the old script piped pip
through `tail` and lost its exit status), a missing CUDA extension is an install failure, bad arguments exit 2.
A stand-in `python` plays pip and the extension import, so nothing is installed."""

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_job.sh"


def fake_python(tmp_path: Path, pip_rc: int, ext_rc: int) -> Path:
    path = tmp_path / "python"
    path.write_text(f"""#!/usr/bin/env bash
if [ "$2" = pip ]; then echo "building csrc/softmax.cu"; echo "csrc/softmax.cu(12): error: bad"; exit {pip_rc}; fi
if [ "$1" = -c ]; then echo "ModuleNotFoundError: No module named 'gpuforge._C'"; exit {ext_rc}; fi
echo "ran $*"
""")
    path.chmod(0o755)
    return path


def run_job(tmp_path: Path, *args: str, pip_rc: int = 0, ext_rc: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": str(fake_python(tmp_path, pip_rc, ext_rc))}
    return subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), *args], capture_output=True, text=True,
                          env=env, timeout=60, cwd=tmp_path)


def test_install_failure_stops_the_job_with_the_compiler_error(tmp_path):
    result = run_job(tmp_path, pip_rc=1)
    assert result.returncode == 1
    assert "install failed" in result.stderr and "softmax.cu(12): error: bad" in result.stderr
    assert "== pytest" not in result.stdout  # nothing after the failed install ran
    assert "softmax.cu(12): error: bad" in (tmp_path / "out" / "install.log").read_text()  # the full log is kept


def test_missing_extension_is_an_install_failure(tmp_path):
    result = run_job(tmp_path, "--stage", "install", ext_rc=1)
    assert result.returncode == 1 and "gpuforge._C did not build" in result.stderr


def test_stages_run_in_order_and_bench_gets_its_options(tmp_path):
    result = run_job(tmp_path, "--stage", "install", "--stage", "bench", "--quick", "--time-budget", "300")
    assert result.returncode == 0, result.stderr
    assert "ran -m gpuforge info" in result.stdout
    assert "ran -m gpuforge bench all --quick --time-budget 300 --report" in result.stdout
    assert "== pytest" not in result.stdout


@pytest.mark.parametrize("args", [("--stage", "deploy"), ("--bogus",)])
def test_bad_arguments_exit_2(tmp_path, args):
    assert run_job(tmp_path, *args).returncode == 2
