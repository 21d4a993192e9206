"""Self-check protocol: each op module `gpuforge.kernels.<op>` exposes `selfcheck_cases(device)`, and
`python -m gpuforge check` runs every case on every backend of the op that can run here against its float64
reference. Cases are small, so the whole check takes seconds even under the simulators."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

import torch

Outputs = torch.Tensor | tuple[torch.Tensor, ...]


@dataclass(frozen=True)
class CheckCase:
    op: str
    label: str  # shape and dtype, e.g. "fp16 (97, 130)"
    run: Callable[[str], Outputs]  # backend name -> outputs (forward, and gradients where the op has them)
    reference: Callable[[], Outputs]  # the same outputs in float64
    tol: float  # max relative error ‖out − ref‖∞ / ‖ref‖∞
    dtype: torch.dtype | None = None  # lets the check skip (backend, dtype) pairs an op declares unsupported


@dataclass(frozen=True)
class CheckResult:
    op: str
    label: str
    backend: str
    error: float  # max relative error over all outputs (inf on NaN or shape mismatch)
    tol: float
    message: str = ""  # the exception, if the run raised

    @property
    def passed(self) -> bool:
        return not self.message and self.error <= self.tol


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖∞ / ‖ref‖∞ in float64; a NaN/Inf where the reference is finite, or a shape mismatch, is inf."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape or not torch.equal(torch.isnan(out64), torch.isnan(ref64)):
        return float("inf")
    finite = torch.isfinite(ref64)
    if not torch.equal(out64[~finite], ref64[~finite]):
        return float("inf")
    if not finite.any():
        return 0.0
    return (out64[finite] - ref64[finite]).abs().max().item() / max(ref64[finite].abs().max().item(), 1e-30)


def outputs_and_grads(fn: Callable, inputs: tuple[torch.Tensor, ...], grad_output: torch.Tensor) -> Outputs:
    """(fn(*inputs) detached, then its gradient with respect to each input for `grad_output`): the inputs enter
    as fresh leaves, so a case can run again. The self-checks of every differentiable op return this."""
    leaves = tuple(t.detach().clone().requires_grad_() for t in inputs)
    out = fn(*leaves)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad_output))


def _as_tuple(outputs: Outputs) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def run_case(case: CheckCase, backend: str, reference: Outputs) -> CheckResult:
    try:
        outs = _as_tuple(case.run(backend))
    except Exception as err:  # a crash is a failed check, reported with its message
        return CheckResult(case.op, case.label, backend, float("inf"), case.tol, f"{type(err).__name__}: {err}")
    refs = _as_tuple(reference)
    if len(outs) != len(refs):
        return CheckResult(case.op, case.label, backend, float("inf"), case.tol,
                           f"{len(outs)} outputs, reference has {len(refs)}")
    error = max(relative_error(o, r) for o, r in zip(outs, refs))
    return CheckResult(case.op, case.label, backend, error, case.tol)


def op_modules():
    """Every gpuforge.kernels module that defines selfcheck_cases (discovered, so ops register themselves)."""
    import gpuforge.kernels as kernels_pkg

    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        if info.ispkg or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"gpuforge.kernels.{info.name}")
        if hasattr(module, "selfcheck_cases") and hasattr(module, "BACKENDS"):
            yield module
