"""Fixtures of the tests/csrc tests: the SIMT-emulated CUDA kernels, built once per session and driver."""

import pytest

from tests.csrc import simt_build


@pytest.fixture(scope="session")
def simt_lib(tmp_path_factory):
    """simt_lib("softmax") -> ctypes.CDLL of tests/csrc/simt/softmax.cpp (skips without g++)."""
    if not simt_build.gxx_available():
        pytest.skip("needs g++ to build the SIMT emulation of the CUDA kernels")
    built = {}

    def get(driver: str):
        if driver not in built:
            built[driver] = simt_build.build(driver, tmp_path_factory.mktemp(f"simt_{driver}"))
        return built[driver]

    return get
