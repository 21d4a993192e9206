"""Build gpuforge: pure-Python packages mapped under one import name, plus the optional CUDA extension.

The extension `gpuforge._C` is built by CMake (CMakeLists.txt) from `csrc/*.cu` and `csrc/bindings.cpp`.
It is torch-free, so it builds against a CPU-only torch. It is skipped, with a message, when nvcc is
absent or GPUFORGE_BUILD_CUDA=0; when nvcc is present, a compile error fails the install.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent

# Top-level folders of the repository, each installed under the single import name `gpuforge`; every folder
# below them with an __init__.py is a subpackage (kernels/triton -> gpuforge.kernels.triton, ...).
TOP_LEVEL = {
    "gpuforge": "gpuforge",
    "gpuforge.kernels": "kernels",
    "gpuforge.csrc": "csrc",
    "gpuforge.parallel": "parallel",
    "gpuforge.quant": "quant",
    "gpuforge.profiling": "profiling",
    "gpuforge.models": "models",
}


def package_dirs() -> dict[str, str]:
    dirs = {}
    for package, folder in TOP_LEVEL.items():
        for init in sorted((ROOT / folder).rglob("__init__.py")):
            sub = init.parent.relative_to(ROOT / folder).parts
            dirs[".".join((package, *sub))] = "/".join((folder, *sub))
    return dirs


PACKAGE_DIRS = package_dirs()


def find_nvcc():
    """The nvcc to build with, or None when the CUDA build is off or impossible."""
    if os.environ.get("GPUFORGE_BUILD_CUDA", "1") == "0":
        return None
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    if nvcc is None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        candidate = Path(cuda_home) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    return nvcc


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build CMakeLists.txt; the build folder persists under build/ so rebuilds are incremental."""

    def run(self):
        nvcc = find_nvcc()
        if nvcc is None:
            reason = "GPUFORGE_BUILD_CUDA=0" if os.environ.get("GPUFORGE_BUILD_CUDA") == "0" else "nvcc not found"
            print(f"gpuforge: skipping the CUDA extension ({reason}); every other backend still works.")
            return
        for ext in self.extensions:
            self.build_cmake(ext, nvcc)

    def build_cmake(self, ext, nvcc):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        # CMake's cache remembers the cmake that configured it; pip's isolated build envs are temporary, so
        # the folder is keyed by that cmake and a stable one (the venv's) keeps incremental rebuilds.
        cmake = shutil.which("cmake") or "cmake"
        key = hashlib.sha1(f"{cmake}|{sys.executable}".encode()).hexdigest()[:10]
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}-{key}"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DGPUFORGE_OUTPUT_DIR={out_dir}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        jobs = os.environ.get("GPUFORGE_BUILD_JOBS", str(os.cpu_count() or 1))
        subprocess.run(configure, check=True)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)


setup(
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"gpuforge.csrc": ["*.cu", "*.cuh", "*.h", "*.cpp"]},
    ext_modules=[CMakeExtension("gpuforge._C")],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
