"""The cupy backend compiles csrc/*.cu at run time with NVRTC. NVRTC needs no GPU, so CI compiles every
source here, for sm_80 and sm_90a, with the template instantiations the cupy wrappers ask for: a source that
only nvcc accepts (host headers outside `#ifndef __CUDACC_RTC__`) fails in CI, not on a user's GPU."""

import pytest

from gpuforge.kernels.cupy.instantiations import NAME_EXPRESSIONS
from gpuforge.profiling.static import nvrtc

pytestmark = pytest.mark.skipif(not nvrtc.available(),
                                reason="needs the nvidia-cuda-nvrtc wheel and CUDA headers (the dev extra)")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("source", sorted(nvrtc.CSRC.glob("*.cu")), ids=lambda p: p.name)
def test_source_compiles_under_nvrtc(source, arch):
    names = NAME_EXPRESSIONS.get(source.name, [])
    build = nvrtc.compile_source(source, names, arch)
    assert build.status == 0, f"NVRTC failed on {source.name} ({arch}):\n{build.log}"
    assert all(build.lowered.get(name) for name in names), build.lowered
    assert build.cubin[:4] == b"\x7fELF"
