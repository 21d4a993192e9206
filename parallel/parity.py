"""The verdict of a parallel run against single-process training: the largest difference (parameters or
losses) must stay within the tolerance of the dtype, or `gpuforge train` exits non-zero."""

from __future__ import annotations

# float64 runs agree to rounding (~1e-15 per op, a few steps); float32 runs to its rounding over the same steps.
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


def verdict(what: str, diff: float, dtype: str) -> tuple[bool, str]:
    tolerance = TOLERANCE[dtype]
    ok = diff <= tolerance
    return ok, f"{'parity ok' if ok else 'PARITY FAILED'}: max |{what}| = {diff:.3e} (tolerance {tolerance:.0e})"
