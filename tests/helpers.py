"""Assertions shared by kernel tests: float64 references, per-dtype tolerances, poisoned outputs."""

from __future__ import annotations

import torch

# Max relative error (‖out − ref‖∞ / ‖ref‖∞) allowed against a float64 reference, per input dtype. On a CPU
# the Triton interpreter computes fp32 dots exactly in fp32; on a GPU they may use tf32, hence the looser fp32.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}
REL_TOL_GPU_FP32_DOT = 2e-3


def max_rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖∞ / max(‖ref‖∞, tiny), in float64; NaN/Inf where ref is finite give inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    if not torch.equal(torch.isnan(out64), torch.isnan(ref64)):
        return float("inf")
    finite = torch.isfinite(ref64)
    if not torch.equal(out64[~finite], ref64[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    diff = (out64[finite] - ref64[finite]).abs().max().item()
    scale = max(ref64[finite].abs().max().item(), 1e-30)
    return diff / scale


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    err = max_rel_error(out, ref)
    assert err <= tol, f"{what}: max relative error {err:.3e} > tolerance {tol:.1e}"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN so any element a kernel forgets to write fails the comparison."""
    return t.fill_(float("nan"))
