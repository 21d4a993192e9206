"""The CUDA extension: built when nvcc exists, with sm_80 and sm_90a machine code, and failing cleanly
(an exception, not a crash) when called on a machine without a driver."""

import importlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

NVCC = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "nvcc")
NVCC_PRESENT = Path(NVCC).exists() and os.environ.get("GPUFORGE_BUILD_CUDA", "1") != "0"
needs_nvcc = pytest.mark.skipif(not NVCC_PRESENT, reason="no nvcc here (or GPUFORGE_BUILD_CUDA=0): nothing to build")


def find_cuobjdump():
    candidates = [shutil.which("cuobjdump"), Path(NVCC).parent / "cuobjdump"]
    try:
        import triton

        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c and Path(c).exists()), None)


@needs_nvcc
def test_extension_is_built():
    extension = importlib.import_module("gpuforge._C")
    assert hasattr(extension, "vector_add")


@needs_nvcc
def test_cubins_hold_sm80_and_sm90a_code():
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump here (neither the CUDA toolkit's nor triton's bundled one)")
    so = importlib.import_module("gpuforge._C").__file__
    listing = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    assert "sm_90a" in listing, listing
    assert "sm_80" in listing, listing


@needs_nvcc
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks behaviour without a CUDA driver")
def test_calls_without_a_driver_raise_instead_of_crashing():
    extension = importlib.import_module("gpuforge._C")
    with pytest.raises(RuntimeError, match=r"gpuforge._C.device_count: CUDA error"):
        extension.device_count()
    with pytest.raises(RuntimeError, match=r"gpuforge._C.vector_add: CUDA error"):
        extension.vector_add(16, 16, 16, 4, 0, 0)


@needs_nvcc
def test_binding_checks_arguments():
    extension = importlib.import_module("gpuforge._C")
    with pytest.raises(ValueError, match="dtype: unknown dtype code 7"):
        extension.vector_add(16, 16, 16, 4, 7, 0)
    with pytest.raises(ValueError, match="n must be >= 0"):
        extension.vector_add(16, 16, 16, -1, 0, 0)


# The Hopper kernels, with the SASS each must hold: fp16 and bf16 warpgroup MMAs, tensor-map loads and stores of
# its rank, register reallocation.
HOPPER_KERNELS = {
    "matmul_wgmma_kernel": ("HGMMA.64x128x16.F32.BF16", "HGMMA.64x128x16.F32 ", "UTMALDG.3D", "UTMASTG.3D",
                            "USETMAXREG"),
    "flash_attention_fwd_wgmma_kernel": ("HGMMA.64x128x16.F32.BF16", "HGMMA.64x128x16.F32 ", "UTMALDG.4D",
                                         "UTMASTG.4D", "USETMAXREG"),
}


@needs_nvcc
@pytest.mark.parametrize("kernel", list(HOPPER_KERNELS))
def test_the_hopper_kernels_run_on_wgmma_and_tma_without_spills(kernel):
    """csrc/matmul_wgmma.cu's and csrc/flash_attention_wgmma.cu's sm_90a machine code, read back from the built
    extension: warpgroup MMAs (HGMMA), tensor-map loads and stores (UTMALDG, UTMASTG), register reallocation
    (USETMAXREG), and no local memory (no spills). Their numbers are checked in the SIMT emulator
    (tests/csrc/test_matmul_wgmma_simt.py, tests/csrc/test_flash_attention_wgmma_simt.py)."""
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump here (neither the CUDA toolkit's nor triton's bundled one)")
    so = importlib.import_module("gpuforge._C").__file__
    listing = subprocess.run([cuobjdump, "-sass", "-arch", "sm_90a", so], capture_output=True, text=True,
                             check=True).stdout
    mangled = f"_ZN8gpuforge{len(kernel)}{kernel}"
    functions = [f for f in listing.split("Function : ")[1:] if f.startswith(mangled)]
    assert len(functions) == 2, f"expected the fp16 and bf16 instantiations of {kernel}"
    sass = "\n".join(functions)
    for instruction in HOPPER_KERNELS[kernel]:
        assert instruction in sass, f"{instruction} missing from {kernel}'s sm_90a SASS"
    assert "STL" not in sass and "LDL" not in sass, f"{kernel} spills to local memory"


@needs_nvcc
@pytest.mark.parametrize("source", ["matmul_wgmma.cu", "flash_attention_wgmma.cu"])
def test_ptxas_keeps_the_wgmma_groups_asynchronous(tmp_path, source):
    """ptxas serialises wgmma (C7514) when ordinary instructions touch a group's registers before its wait, and
    injects fences (C7519) where the kernel forgot one: neither may happen in the Hopper kernels, or their
    tensor cores stall while the SASS still shows HGMMA."""
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    build = subprocess.run([str(NVCC), "-std=c++17", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", f"-I{csrc}",
                            "-o", str(tmp_path / "kernel.cubin"), str(csrc / source)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    for code in ("C7514", "C7519"):
        assert code not in build.stderr, [line for line in build.stderr.splitlines() if code in line][:2]
    assert "Compiling entry function" in build.stderr  # -v reported on the kernels
