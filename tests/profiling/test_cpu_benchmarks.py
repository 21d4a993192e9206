"""CPU-side benchmarks tracked with pytest-benchmark (`pytest --benchmark-only`): interpreter-mode kernels.
Each also checks its result, so a fast wrong kernel fails."""

import torch

import gpuforge as gf


def test_vector_add_triton_interpreter(benchmark):
    a, b = torch.randn(4096), torch.randn(4096)
    out = benchmark.pedantic(gf.vector_add, args=(a, b), kwargs={"backend": "triton"}, rounds=3, iterations=1)
    torch.testing.assert_close(out, a + b)


def test_vector_add_numba_simulator(benchmark):
    a, b = torch.randn(512), torch.randn(512)
    out = benchmark.pedantic(gf.vector_add, args=(a, b), kwargs={"backend": "numba"}, rounds=3, iterations=1)
    torch.testing.assert_close(out, a + b)
