"""The backend registry: what can run here, and why not."""

import pytest
import torch

import gpuforge as gf


def test_every_backend_is_reported_with_a_reason():
    status = gf.backends.available()
    assert set(status) == {"torch", "triton", "cuda", "cupy", "numba"}
    for name, (ok, reason) in status.items():
        assert isinstance(ok, bool) and reason, name
    assert status["torch"][0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="describes a machine without a GPU")
def test_cpu_machine_runs_simulators_and_explains_gpu_backends():
    status = gf.backends.available()
    assert status["triton"] == (True, status["triton"][1]) and "interpreter" in status["triton"][1]
    assert status["numba"][0] and "simulator" in status["numba"][1]
    assert not status["cuda"][0] and ("not built" in status["cuda"][1] or "no CUDA device" in status["cuda"][1])
    assert not status["cupy"][0] and status["cupy"][1]


def test_named_backend_without_implementation_is_rejected():
    from gpuforge.kernels._dispatch import OpBackends

    table = OpBackends("toy", {"torch": "x:y"}, auto_order=())
    with pytest.raises(ValueError, match="toy has no triton implementation"):
        table.select("triton", torch.device("cpu"))


@pytest.mark.gpu
def test_gpu_machine_has_all_five_backends():
    status = gf.backends.available()
    assert all(ok for ok, _ in status.values()), status
