"""Test set-up shared by the whole suite.

On a machine without a CUDA GPU, Triton kernels run under the interpreter and numba.cuda kernels under the
simulator: both switches are read when the kernel modules are first imported, so they are set here, before
any test imports gpuforge's kernels. Tests marked `gpu` are skipped, with the reason, when there is no GPU.
`auto`'s tune cache is a fresh file per session, never the user's (GPUFORGE_TUNE_CACHE).
"""

import os
import tempfile

import torch

os.environ["GPUFORGE_TUNE_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="gpuforge-tests-"), "tune.json")

GPU_PRESENT = torch.cuda.is_available()

if not GPU_PRESENT:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if GPU_PRESENT:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; torch.cuda.is_available() is False on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> torch.device:
    """The device kernels run on: the GPU when there is one, else the CPU (through the simulators)."""
    return torch.device("cuda" if GPU_PRESENT else "cpu")


@pytest.fixture(autouse=True)
def _poison_kernel_outputs():
    """Every kernel output starts as NaN in tests, so unwritten elements fail."""
    from gpuforge.kernels import _alloc

    _alloc.set_poison(True)
    yield
    _alloc.set_poison(False)
