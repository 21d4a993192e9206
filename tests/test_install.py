"""A clean, non-editable `pip install .` into a new virtualenv puts exactly one package, gpuforge, into
site-packages (kernels/, parallel/, … mapped under it, the CUDA sources shipped for the cupy backend), and it
imports from outside the repository."""

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_clean_install_imports_from_outside_the_repo(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    env = {**os.environ, "GPUFORGE_BUILD_CUDA": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(ROOT)], check=True, env=env,
                   cwd=tmp_path)
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    installed = {p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and
                 p.name not in {"pip", "setuptools", "_distutils_hack", "pkg_resources", "__pycache__"}}
    assert installed == {"gpuforge"}, installed
    assert (site / "gpuforge" / "csrc" / "vector_add.cu").exists()
    # torch and the kernel packages come from the test environment; gpuforge itself only from the new venv
    # (.pth files on PYTHONPATH are not processed, so the editable install here stays invisible).
    env["PYTHONPATH"] = sysconfig.get_paths()["purelib"]
    code = ("import gpuforge, gpuforge.kernels.vector_add, gpuforge.profiling.harness, torch;"
            f"assert gpuforge.__file__.startswith({str(site)!r}), gpuforge.__file__;"
            "print(gpuforge.vector_add(torch.ones(3), torch.ones(3)).tolist())")
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[2.0, 2.0, 2.0]"
