"""The backend registry and the per-op dispatch table: what can run here, why not, and what `auto` picks."""

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


def _toy_table():
    from gpuforge.kernels.dispatch import Implementation, Limits, OpBackends

    double = Implementation(forward=lambda x: 2 * x)
    return OpBackends("toy", {"torch": lambda: double, "triton": lambda: double, "cuda": lambda: double},
                      auto_order=("cuda", "triton"),
                      limits={"cuda": Limits(dtypes=(torch.bfloat16,), max_width=8, why="a row stays on chip")})


def test_named_backend_without_implementation_is_rejected():
    from gpuforge.kernels.dispatch import Implementation, OpBackends

    table = OpBackends("toy", {"torch": lambda: Implementation(forward=lambda x: x)}, auto_order=())
    with pytest.raises(ValueError, match="toy has no triton implementation"):
        table.select("triton", torch.device("cpu"))


def test_limits_are_data_that_auto_passes_over_and_a_named_backend_reports(monkeypatch):
    """`auto` skips a backend whose limits exclude the input; the same backend named in the call raises,
    naming the limit (TypeError for a dtype, ValueError for a width)."""
    from gpuforge.kernels import backends

    table = _toy_table()
    monkeypatch.setattr(backends, "is_available", lambda name: (True, "test"))
    cuda = torch.device("cuda")
    assert table.select("auto", cuda, dtype=torch.float16, width=8) == "cuda"
    assert table.select("auto", cuda, dtype=torch.bfloat16, width=8) == "triton"
    assert table.select("auto", cuda, dtype=torch.float16, width=9) == "triton"
    with pytest.raises(TypeError, match="backend='cuda' cannot run toy on this input: it has no bfloat16"):
        table.select("cuda", cuda, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"last dim must be <= 8, got 9 \(a row stays on chip\)"):
        table.select("cuda", cuda, dtype=torch.float16, width=9)
    assert table.impl("torch").forward(torch.ones(2)).tolist() == [2.0, 2.0]


def test_gpuforge_backend_preference_falls_back_when_it_cannot_take_the_dtype(monkeypatch):
    """GPUFORGE_BACKEND=cuda with a bfloat16 input and backend="auto" takes the next backend, it does not raise."""
    from gpuforge.kernels import backends

    monkeypatch.setattr(backends, "is_available", lambda name: (True, "test"))
    monkeypatch.setenv("GPUFORGE_BACKEND", "cuda")
    assert _toy_table().select("auto", torch.device("cuda"), dtype=torch.bfloat16) == "triton"
    assert _toy_table().select("auto", torch.device("cuda"), dtype=torch.float16) == "cuda"


def test_the_compile_constant_mark_is_the_one_torch_sets():
    """backends.constant_under_compile stands in for torch.compiler.assume_constant_result without importing
    torch._dynamo; if torch ever marks functions differently, this fails."""
    from gpuforge.kernels.backends import constant_under_compile, select

    def f():
        return 1

    marked = torch.compiler.assume_constant_result(f)
    ours = constant_under_compile(lambda: 1)
    assert marked is f and vars(f) == vars(ours) == {"_dynamo_marked_constant": True}
    assert select._dynamo_marked_constant


@pytest.mark.gpu
def test_gpu_machine_has_all_five_backends():
    status = gf.backends.available()
    assert all(ok for ok, _ in status.values()), status
