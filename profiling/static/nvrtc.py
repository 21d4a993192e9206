"""NVRTC through ctypes (the nvidia-cuda-nvrtc wheel: no GPU, no CUDA runtime): compile a csrc/*.cu source for
an architecture with named template instantiations, and get its log, lowered names and cubin. Used by the CI
test that every source compiles under NVRTC and by `gpuforge inspect` to read the NVRTC builds' resources."""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"


def cuda_include() -> Path:
    return Path(os.environ.get("CUDA_HOME", os.environ.get("CUDA_PATH", "/usr/local/cuda"))) / "include"


@functools.cache
def library():
    """The NVRTC shared library of the nvidia-cuda-nvrtc wheel, or None when it is not installed."""
    libs = sorted(glob.glob(f"{sysconfig.get_paths()['purelib']}/nvidia/*/lib/libnvrtc.so.*"))
    libs = [lib for lib in libs if ".alt." not in lib]
    if not libs:
        return None
    for builtin in glob.glob(str(Path(libs[0]).parent / "libnvrtc-builtins.so.*")):
        if ".alt." not in builtin:
            ctypes.CDLL(builtin, mode=ctypes.RTLD_GLOBAL)  # NVRTC dlopens it by soname
    return ctypes.CDLL(libs[0])


def available() -> bool:
    return library() is not None and (cuda_include() / "cuda_fp16.h").exists()


@dataclass
class Build:
    status: int  # nvrtcResult: 0 on success
    log: str
    lowered: dict[str, str]  # name expression -> mangled kernel name
    cubin: bytes


def compile_source(source: Path, names: list[str], arch: str) -> Build:
    """Compile `source` for `arch` ("sm_80", "sm_90a") with the kernels `names` instantiated."""
    nvrtc = library()
    program = ctypes.c_void_p()
    if nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.read_bytes(), source.name.encode(), 0, None,
                                None) != 0:
        raise RuntimeError(f"{source}: nvrtcCreateProgram failed")
    try:
        for name in names:
            nvrtc.nvrtcAddNameExpression(program, name.encode())
        options = [b"-std=c++17", f"-I{CSRC}".encode(), f"-I{cuda_include()}".encode(),
                   f"--gpu-architecture={arch}".encode()]
        status = nvrtc.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, log)
        lowered, cubin = {}, b""
        if status == 0:
            for name in names:
                out = ctypes.c_char_p()
                nvrtc.nvrtcGetLoweredName(program, name.encode(), ctypes.byref(out))
                lowered[name] = out.value.decode() if out.value else ""
            nvrtc.nvrtcGetCUBINSize(program, ctypes.byref(size))
            buffer = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetCUBIN(program, buffer)
            cubin = buffer.raw
        return Build(status, log.value.decode(errors="replace"), lowered, cubin)
    finally:
        nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
