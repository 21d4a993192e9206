"""The emulator's tensor-core fragment maps against an independent source: CuTe's MMA_Traits (SM80 m16n8k16,
fp16 and bf16) and Copy_Traits (SM75 ldmatrix x1/x2/x4, plain and .trans) from the nvidia-cutlass wheel, compiled
on the host with g++ (tests/csrc/simt/cute_layouts.cpp: every lane, register and value of A, B, C and of the
ldmatrix source and destination layouts). A map moved by one must fail the same comparison."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.csrc.simt_build import SIMT_DIR

cutlass_library = pytest.importorskip("cutlass_library", reason="needs the nvidia-cutlass wheel (CuTe's headers)")


def _include_dirs() -> list[Path]:
    cute = Path(cutlass_library.__file__).parent / "source" / "include"
    cuda = Path(os.environ.get("CUDA_HOME", os.environ.get("CUDA_PATH", "/usr/local/cuda"))) / "include"
    dirs = [cute, cuda, cuda / "cccl"]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing or shutil.which("g++") is None:
        pytest.skip(f"needs g++ and CuTe's and the CUDA toolkit's headers (missing: {missing})")
    return dirs


def _run(tmp_path: Path, fragments: str) -> subprocess.CompletedProcess:
    # both files side by side in tmp_path: a quoted #include looks next to the including file first
    (tmp_path / "fragments.h").write_text(fragments)
    shutil.copy(SIMT_DIR / "cute_layouts.cpp", tmp_path / "cute_layouts.cpp")
    binary = tmp_path / "cute_layouts"
    includes = [f"-I{d}" for d in _include_dirs()]
    subprocess.run(["g++", "-std=c++17", "-O1", "-w", *includes, str(tmp_path / "cute_layouts.cpp"), "-o",
                    str(binary)], check=True)
    return subprocess.run([str(binary)], capture_output=True, text=True)


def test_fragment_maps_equal_cutes_for_every_lane(tmp_path):
    proc = _run(tmp_path, (SIMT_DIR / "fragments.h").read_text())
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.strip().endswith("15472 checks, 0 mismatches")


@pytest.mark.parametrize("original, mutated", [
    ("return {g + 8 * (reg % 2), 2 * t + half + 8 * (reg / 2)};",
     "return {g + 8 * (reg / 2), 2 * t + half + 8 * (reg % 2)};"),
    ("return {2 * t + half + 8 * reg, g};", "return {2 * t + 1 - half + 8 * reg, g};"),
    ("return {g + 8 * (index / 2), 2 * t + index % 2};", "return {g + 8 * (index % 2), 2 * t + index / 2};"),
    ("const int r = lane / 4, c = 2 * (lane % 4) + half;", "const int r = lane % 8, c = 2 * (lane / 8) + half;"),
], ids=["A", "B", "C", "ldmatrix"])
def test_a_moved_map_is_caught(tmp_path, original, mutated):
    source = (SIMT_DIR / "fragments.h").read_text()
    assert original in source
    proc = _run(tmp_path, source.replace(original, mutated))
    assert proc.returncode == 1 and "MISMATCH" in proc.stdout
