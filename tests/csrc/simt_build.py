"""Builds a C driver of tests/csrc/simt/ (csrc/ kernels + the SIMT emulator) into a shared library with g++.

The kernels' own source is compiled, as C++20 with __CUDACC_RTC__ defined (which hides the host launchers and
their <<<...>>> syntax, as for NVRTC) and -fno-strict-aliasing (CUDA code reads a uint4 through a T*, as nvcc
allows). The one PTX instruction the emulator knows, `lop3.b32` with an immediate truth table, is rewritten
into a call of simt::lop3 in a copy of the .cu files that use it; any other inline PTX stays and fails to
assemble, so nothing is emulated silently."""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
SIMT_DIR = ROOT / "tests" / "csrc" / "simt"
CSRC_DIR = ROOT / "csrc"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/dtype.h

_LOP3 = re.compile(r'asm\("lop3\.b32 %0, %1, %2, %3, (0x[0-9A-Fa-f]+);"\s*:\s*"=r"\((\w+)\)\s*:\s*'
                   r'"r"\((\w+)\),\s*"r"\((\w+)\),\s*"r"\((\w+)\)\);')


def translate_ptx(source: str) -> str:
    """`asm("lop3.b32 %0, %1, %2, %3, IMM;" : "=r"(d) : "r"(a), "r"(b), "r"(c));` -> `d = simt::lop3<IMM>(a, b, c);`"""
    return _LOP3.sub(r"\2 = simt::lop3<\1>(\3, \4, \5);", source)


def gxx_available() -> bool:
    return shutil.which("g++") is not None


def build(driver: str, out_dir: Path) -> ctypes.CDLL:
    """Compiles tests/csrc/simt/<driver>.cpp into out_dir/lib<driver>_simt.so and loads it."""
    translated = out_dir / "csrc"
    translated.mkdir(parents=True, exist_ok=True)
    for cu in CSRC_DIR.glob("*.cu"):
        text = cu.read_text()
        if _LOP3.search(text):
            (translated / cu.name).write_text(translate_ptx(text))
    lib = out_dir / f"lib{driver}_simt.so"
    subprocess.run(["g++", "-std=c++20", "-O2", "-fPIC", "-shared", "-fno-strict-aliasing", "-D__CUDACC_RTC__",
                    "-Wall", "-Werror", "-Wno-unknown-pragmas", f"-I{SIMT_DIR}", f"-I{translated}", f"-I{CSRC_DIR}",
                    str(SIMT_DIR / f"{driver}.cpp"), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    """The tensor's data pointer as a C argument (NULL for None)."""
    return ctypes.c_void_p(t.data_ptr() if t is not None else None)
