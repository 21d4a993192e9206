"""The cupy backend compiles csrc/*.cu at run time with NVRTC. NVRTC needs no GPU, so CI compiles every
source here, for sm_80 and sm_90a, with the template instantiations the cupy wrappers ask for: a source that
only nvcc accepts (host headers outside `#ifndef __CUDACC_RTC__`) fails in CI, not on a user's GPU."""

import ctypes
import glob
import os
import sysconfig
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CUDA_INCLUDE = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"

# Kernels each cupy wrapper instantiates, by source file.
NAME_EXPRESSIONS = {
    "vector_add.cu": [f"gpuforge::vector_add_{kind}_kernel<{t}>" for kind in ("vec16", "scalar")
                      for t in ("float", "__half", "__nv_bfloat16")],
    "rms_norm.cu": [f"gpuforge::rms_norm_forward_kernel<{t}, {v}, {res}>"
                    for t, vec in (("float", 4), ("__half", 8), ("__nv_bfloat16", 8)) for v in (1, vec)
                    for res in ("true", "false")]
                   + [f"gpuforge::rms_norm_backward_kernel<{t}, {v}, {dh}, {atomic}>"
                      for t, vec in (("float", 4), ("__half", 8), ("__nv_bfloat16", 8)) for v in (1, vec)
                      for dh in ("true", "false") for atomic in ("true", "false")]
                   + [f"gpuforge::rms_norm_sum_partials_kernel<{t}>"
                      for t in ("float", "__half", "__nv_bfloat16")],
    "matmul.cu": [f"gpuforge::matmul_tiled_kernel<{t}>" for t in ("float", "__half", "__nv_bfloat16")]
    + [f"gpuforge::matmul_mma_kernel<{t}>" for t in ("__half", "__nv_bfloat16")],
    # no cupy wrapper; instantiated so that CI compiles the tensor-core kernel's device code under NVRTC
    "flash_attention.cu": [f"gpuforge::flash_attention_fwd_mma_kernel<{t}, {d}>" for t in ("__half", "__nv_bfloat16")
                           for d in (64, 128)],
    "flash_attention_bwd.cu": [f"gpuforge::flash_attention_bwd_{kind}_kernel<{t}, {p}>"
                               for kind in ("delta", "dq", "dkdv") for t in ("float", "__half", "__nv_bfloat16")
                               for p in (1, 2, 4, 8)],
    "int4_matmul.cu": [f"gpuforge::int4_matmul_tiled_kernel<{x}, {s}>" for x in ("__half", "__nv_bfloat16")
                       for s in ("float", "__half", "__nv_bfloat16")],
}


def load_nvrtc():
    libs = sorted(glob.glob(f"{sysconfig.get_paths()['purelib']}/nvidia/*/lib/libnvrtc.so.*"))
    libs = [lib for lib in libs if ".alt." not in lib]
    if not libs:
        return None
    builtins = glob.glob(str(Path(libs[0]).parent / "libnvrtc-builtins.so.*"))
    for lib in builtins:
        if ".alt." not in lib:
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)  # NVRTC dlopens it by soname
    return ctypes.CDLL(libs[0])


NVRTC = load_nvrtc()
pytestmark = pytest.mark.skipif(NVRTC is None or not (CUDA_INCLUDE / "cuda_fp16.h").exists(),
                                reason="needs the nvidia-cuda-nvrtc wheel and CUDA headers (the dev extra)")


def compile_with_nvrtc(source: Path, names: list[str], arch: str) -> tuple[int, str, dict[str, str]]:
    program = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(program), source.read_bytes(), source.name.encode(), 0, None,
                                    None) == 0
    for name in names:
        assert NVRTC.nvrtcAddNameExpression(program, name.encode()) == 0
    options = [b"-std=c++17", f"-I{CSRC}".encode(), f"-I{CUDA_INCLUDE}".encode(), f"--gpu-architecture={arch}".encode()]
    status = NVRTC.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(program, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    NVRTC.nvrtcGetProgramLog(program, log)
    lowered = {}
    if status == 0:
        for name in names:
            out = ctypes.c_char_p()
            NVRTC.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(out))
            lowered[name] = out.value.decode() if out.value else ""
    NVRTC.nvrtcDestroyProgram(ctypes.byref(program))
    return status, log.value.decode(errors="replace"), lowered


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("source", sorted(CSRC.glob("*.cu")), ids=lambda p: p.name)
def test_source_compiles_under_nvrtc(source, arch):
    names = NAME_EXPRESSIONS.get(source.name, [])
    status, log, lowered = compile_with_nvrtc(source, names, arch)
    assert status == 0, f"NVRTC failed on {source.name} ({arch}):\n{log}"
    assert all(lowered.get(name) for name in names), lowered
