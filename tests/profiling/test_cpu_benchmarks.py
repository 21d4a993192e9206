"""CPU-side benchmarks tracked with pytest-benchmark (`pytest --benchmark-only`): interpreter-mode kernels.
Each also checks its result, so a fast wrong kernel fails."""

import torch

import gpuforge as gf

# One untimed warm-up round first: the first call pays for JIT compilation / the simulator's set-up.
ROUNDS = {"rounds": 3, "iterations": 1, "warmup_rounds": 1}


def test_vector_add_triton_interpreter(benchmark):
    a, b = torch.randn(4096), torch.randn(4096)
    out = benchmark.pedantic(gf.vector_add, args=(a, b), kwargs={"backend": "triton"}, **ROUNDS)
    torch.testing.assert_close(out, a + b)


def test_vector_add_numba_simulator(benchmark):
    a, b = torch.randn(512), torch.randn(512)
    out = benchmark.pedantic(gf.vector_add, args=(a, b), kwargs={"backend": "numba"}, **ROUNDS)
    torch.testing.assert_close(out, a + b)


def test_pipeline_simulator_1f1b(benchmark):
    from gpuforge.parallel.model_parallel.pipeline_schedule import one_f_one_b
    from gpuforge.parallel.model_parallel.pipeline_sim import simulate

    schedule = one_f_one_b(8, 32)
    result = benchmark.pedantic(simulate, args=(schedule,), **ROUNDS)
    assert abs(result.bubble_fraction - 7 / (32 + 7)) < 1e-9


def test_gptq_quantizer(benchmark):
    torch.manual_seed(0)
    weight = torch.randn(128, 256)
    calibration = torch.randn(512, 256)
    q = benchmark.pedantic(gf.quant.quantize_int4, args=(weight,),
                           kwargs={"group_size": 64, "method": "gptq", "calibration": calibration},
                           **ROUNDS)
    rtn = gf.quant.quantize_int4(weight, group_size=64, method="rtn")
    error = lambda w: (calibration @ (gf.quant.dequantize_int4(w).float() - weight).T).norm()
    assert error(q) < error(rtn)
