"""csrc/rms_norm.cu's forward (with and without the fused residual add) and backward (deterministic two-pass
and atomic dw), run on the CPU through the SIMT emulator (tests/csrc/simt/).

Row widths take the scalar and the 16-byte-vector kernels (n and row strides multiples of 16 bytes or not),
one warp to 512 threads per row, rows wider than one chunk per thread; the backward splits the rows into
bands as the launcher does, some bands empty, with its dw in dynamic shared memory (which the emulator fills
with NaN at each block's start). Outputs poisoned with NaN; float64 torch references."""

import ctypes

import pytest
import torch

from gpuforge.kernels.rms_norm import reference_backward, reference_forward
from tests.csrc.simt_build import DTYPE_CODES, ptr
from tests.helpers import REL_TOL, assert_close_rel, poison_

EPS = 1e-6


@pytest.fixture(scope="module")
def lib(simt_lib):
    return simt_lib("rms_norm")


def _stride(t):
    return ctypes.c_longlong(t.stride(0) if t is not None else 0)


def simt_forward(lib, x, weight, residual):
    rows, n = x.shape
    y = poison_(torch.empty(rows, n, dtype=x.dtype))
    h = poison_(torch.empty(rows, n, dtype=x.dtype)) if residual is not None else None
    rstd = poison_(torch.empty(rows))
    assert lib.gf_simt_rms_norm_forward(DTYPE_CODES[x.dtype], ptr(x), _stride(x), ptr(residual), _stride(residual),
                                        ptr(weight), ptr(y), ptr(h), ptr(rstd), ctypes.c_longlong(rows),
                                        ctypes.c_longlong(n), ctypes.c_float(EPS)) == 0
    return y, h, rstd


def simt_backward(lib, dy, x, weight, rstd, dh, blocks, deterministic):
    rows, n = x.shape
    dx = poison_(torch.empty(rows, n, dtype=x.dtype))
    dw = poison_(torch.empty(n, dtype=weight.dtype))
    partial = poison_(torch.empty(blocks, n)) if deterministic else torch.zeros(1, n)
    assert lib.gf_simt_rms_norm_backward(DTYPE_CODES[x.dtype], ptr(dy), _stride(dy), ptr(x), _stride(x), ptr(weight),
                                         ptr(rstd), ptr(dh), _stride(dh), ptr(dx), ptr(dw), ptr(partial),
                                         ctypes.c_int(blocks), ctypes.c_longlong(rows), ctypes.c_longlong(n),
                                         ctypes.c_bool(deterministic)) == 0
    return dx, dw


# (rows, n, row padding, residual, backward blocks): padding 8 keeps 16-byte rows for every dtype, 3 breaks them;
# blocks > ceil(rows / band) leaves the last bands empty.
CASES = [
    (1, 3, 0, False, 1),      # fewer columns than lanes (n = 1 would make dx pure rounding: x̂ = ±1 projects g away)
    (5, 97, 3, True, 4),      # scalar, bands of 2 rows: the fourth band is empty
    (4, 64, 8, True, 3),      # 16-byte vectors, one warp
    (3, 1000, 0, False, 2),   # 16-byte vectors for every dtype, 128 to 256 threads
    (2, 4099, 0, True, 2),    # scalar, 512 threads, 8 or 9 elements per thread
    (3, 4104, 8, False, 1),   # 16-byte vectors, more chunks than threads for 16-bit types
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "rows{}-n{}-pad{}-res{}-blocks{}".format(*c))
def test_forward_and_backward_match_float64(lib, case, dtype):
    rows, n, pad, with_residual, blocks = case
    gen = torch.Generator().manual_seed(rows * n)
    make = lambda: torch.randn(rows, n + pad, generator=gen).to(dtype)[:, :n]  # noqa: E731
    x, dy = make(), make()
    residual, dh = (make(), make()) if with_residual else (None, None)
    weight = (1 + 0.5 * torch.randn(n, generator=gen)).to(dtype)
    tol = REL_TOL[dtype]

    y, h, rstd = simt_forward(lib, x, weight, residual)
    normed = x
    if with_residual:  # the kernel normalises h rounded to the dtype, the h it returns
        assert_close_rel(h, x.double() + residual.double(), tol, f"h {case}")
        normed = h
    ref_y, _, ref_rstd = reference_forward(normed.double(), weight.double(), None, EPS)
    assert_close_rel(rstd, ref_rstd, REL_TOL[torch.float32], f"rstd {case}")
    assert_close_rel(y, ref_y, tol, f"y {case}")

    for deterministic in (True, False):
        dx, dw = simt_backward(lib, dy, normed, weight, rstd, dh, blocks, deterministic)
        ref_dx, ref_dw = reference_backward(dy.double(), normed.double(), weight.double(), rstd.double(),
                                            None if dh is None else dh.double(), deterministic)
        assert_close_rel(dx, ref_dx, tol, f"dx {case} deterministic={deterministic}")
        assert_close_rel(dw, ref_dw, tol, f"dw {case} deterministic={deterministic}")
