"""Assertions shared by kernel tests: float64 references, per-dtype tolerances, poisoned outputs."""

from __future__ import annotations

import torch

from gpuforge.kernels._selfcheck import relative_error

# Max relative error (‖out − ref‖∞ / ‖ref‖∞) allowed against a float64 reference, per input dtype. On a CPU
# the Triton interpreter computes fp32 dots exactly in fp32; on a GPU they may use tf32, hence the looser fp32.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
REL_TOL_GPU_FP32_DOT = 2e-3


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖∞ / ‖ref‖∞ in float64; NaN/Inf where the reference is finite, or a shape mismatch, is inf."""
    return relative_error(out, ref)


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    err = max_rel_error(out, ref)
    assert err <= tol, f"{what}: max relative error {err:.3e} > tolerance {tol:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so any element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))
