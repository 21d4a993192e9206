"""The emulator's tensor-core fragment maps against an independent source: CuTe's MMA_Traits (SM80 m16n8k16,
fp16 and bf16) and Copy_Traits (SM75 ldmatrix x1/x2/x4, plain and .trans) from the nvidia-cutlass wheel, compiled
on the host with g++ (tests/csrc/simt/cute_layouts.cpp: every lane, register and value of A, B, C and of the
ldmatrix source and destination layouts); and the Hopper maps (hopper_layouts.h) against CuTe's SM90 GMMA
descriptors, layout atoms and accumulator layouts (tests/csrc/simt/cute_hopper_layouts.cpp). A map moved by one
must fail the same comparison."""

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


def _run(tmp_path: Path, header: str, text: str, program: str = "cute_layouts") -> subprocess.CompletedProcess:
    """Builds and runs tests/csrc/simt/<program>.cpp against `text` as its copy of the emulator's `header`."""
    # both files side by side in tmp_path: a quoted #include looks next to the including file first
    (tmp_path / header).write_text(text)
    shutil.copy(SIMT_DIR / f"{program}.cpp", tmp_path / f"{program}.cpp")
    binary = tmp_path / program
    includes = [f"-I{d}" for d in _include_dirs()]
    subprocess.run(["g++", "-std=c++17", "-O1", "-w", *includes, str(tmp_path / f"{program}.cpp"), "-o",
                    str(binary)], check=True)
    return subprocess.run([str(binary)], capture_output=True, text=True)


def test_fragment_maps_equal_cutes_for_every_lane(tmp_path):
    proc = _run(tmp_path, "fragments.h", (SIMT_DIR / "fragments.h").read_text())
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
    proc = _run(tmp_path, "fragments.h", source.replace(original, mutated))
    assert proc.returncode == 1 and "MISMATCH" in proc.stdout


def test_hopper_maps_equal_cutes_gmma_descriptors_atoms_and_accumulators(tmp_path):
    proc = _run(tmp_path, "hopper_layouts.h", (SIMT_DIR / "hopper_layouts.h").read_text(), "cute_hopper_layouts")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.strip().endswith("91136 checks, 0 mismatches")


@pytest.mark.parametrize("original, mutated", [
    ("(uk / 8) * d.stride);", "(uk / 8) * d.leading);"),
    ("return address ^ (((address >> 7) & mask) << 4);", "return address ^ (((address >> 7) & mask) << 5);"),
    ("8 * ((value / 2) % 2)", "8 * (value % 2)"),
    ("2 * t + index % 2 + 8 * (index / 4)", "2 * t + index % 2 + 8 * ((index / 2) % 2)"),
], ids=["MN-major k-group stride", "swizzle", "accumulator", "register A"])
def test_a_moved_hopper_map_is_caught(tmp_path, original, mutated):
    source = (SIMT_DIR / "hopper_layouts.h").read_text()
    assert original in source
    proc = _run(tmp_path, "hopper_layouts.h", source.replace(original, mutated), "cute_hopper_layouts")
    assert proc.returncode == 1 and "MISMATCH" in proc.stdout
