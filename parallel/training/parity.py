"""The verdict of a parallel run against single-process training: the largest difference (parameters or
losses) must stay within the tolerance of the dtype, or `gpuforge train` exits non-zero."""

from __future__ import annotations

# float64 runs agree to rounding: measured ≤ 1.4e-14 for every strategy on the CLI's TinyLlama and ≤ 1e-12
# after 20 steps of the small reference models (tests/parallel/test_parity_models.py): 1e-12 is the bound, a
# hundred times the accumulated rounding of those runs. float32: the small models stay within 1e-6
# (FLOAT32_SMALL_MODEL_BOUND, asserted there); the CLI's default TinyLlama (dim 128, 5 AdamW steps, lr 1e-3) lands
# at 1.6e-6, since AdamW divides each gradient by its running RMS and so turns the float32 rounding of a nearly
# cancelling gradient into a visible update, hence the CLI's 1e-5.
TOLERANCE = {"float64": 1e-12, "float32": 1e-5}
FLOAT32_SMALL_MODEL_BOUND = 1e-6


def verdict(what: str, diff: float, dtype: str) -> tuple[bool, str]:
    tolerance = TOLERANCE[dtype]
    ok = diff <= tolerance
    return ok, f"{'parity ok' if ok else 'PARITY FAILED'}: max |{what}| = {diff:.3e} (tolerance {tolerance:.0e})"
