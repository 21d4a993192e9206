"""Every timed function of the CPU quick sweep computes its op (forward: the output; forward+backward: the first
gradient) to float64 accuracy, and every case names baselines it actually times (softmax and rms_norm have the
same check in their kernel tests)."""

import importlib

import pytest
import torch

from gpuforge.kernels._selfcheck import relative_error
from gpuforge.profiling.harness import _first_tensor, _float64


@pytest.mark.parametrize("op", ["vector_add", "matmul", "flash_attention", "int4_matmul", "paged_attention"])
def test_quick_cases_match_the_float64_reference(op):
    cases = importlib.import_module(f"gpuforge.profiling.bench_{op}").bench_cases(torch.device("cpu"), quick=True)
    assert cases
    for case in cases:
        assert case.baseline_labels() <= set(case.fns) and set(case.fns) - case.baseline_labels(), case.shape
        inputs = case.make_inputs()
        want = _first_tensor(case.reference(*_float64(inputs)))
        for label, fn in case.fns.items():
            assert relative_error(_first_tensor(fn(*inputs)), want) < 1e-4, (case.shape, label)
    if op in ("matmul", "flash_attention", "int4_matmul"):
        assert any(case.shape.endswith("fwd+bwd") for case in cases)
