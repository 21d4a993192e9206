"""The SIMT emulator's Hopper copy instructions (tests/csrc/simt/hopper.h) through a probe kernel written with
inline PTX as a CUDA kernel writes it (tests/csrc/simt/hopper_probe.cpp), against the PTX ISA's definitions
written out here in Python: a 2D tensor-map box (cp.async.bulk.tensor tile mode) lands in shared memory densely
packed, rows innermost, swizzled as the map says (the 16-byte chunk index XORed with the row within the 8-row
pattern), out-of-bounds elements zero or NaN; it lands only once a thread waits on its mbarrier, whose phase
parities follow try_wait.parity's definition; cuTensorMapEncodeTiled refuses what the driver refuses, and a box
row shorter than its swizzle span, which the driver allows and the emulator does not emulate. The 3D
boxes, the tensor-map stores and wgmma run in test_matmul_wgmma_simt.py; the address maps are checked against
CuTe in test_ptx_layouts.py."""

import ctypes

import numpy as np
import pytest


@pytest.fixture(scope="module")
def lib(simt_lib):
    return simt_lib("hopper_probe")


def tma_box(lib, matrix, box_rows, box_cols, swizzle, nan_fill, x, y, row_bytes=None):
    box_bytes = box_rows * box_cols * 2
    out = np.zeros(2 * box_bytes, dtype=np.uint8)
    waits = np.full(4, 7, dtype=np.uint32)
    rc = lib.gf_simt_tma_box(matrix.ctypes.data_as(ctypes.c_void_p), ctypes.c_longlong(matrix.shape[0]),
                             ctypes.c_longlong(matrix.shape[1]), ctypes.c_longlong(row_bytes or matrix.strides[0]),
                             box_rows, box_cols, swizzle, nan_fill, x, y, out.ctypes.data_as(ctypes.c_void_p),
                             waits.ctypes.data_as(ctypes.c_void_p))
    return rc, out[:box_bytes], out[box_bytes:], waits


def expected_box(matrix, box_rows, box_cols, swizzle, nan_fill, x, y):
    """The box's bytes as the PTX ISA places them: element (r, c) at byte 2 (r box_cols + c), then Swizzle<B,4,3>
    on that address (B = 0, 1, 2, 3 for none, 32, 64, 128 B)."""
    fill = np.uint16(0xFFFF) if nan_fill else np.uint16(0)
    out = np.zeros(box_rows * box_cols * 2, dtype=np.uint8)
    chunks = {0: 1, 1: 2, 2: 4, 3: 8}[swizzle]
    for r in range(box_rows):
        for c in range(box_cols):
            gr, gc = y + r, x + c
            inside = 0 <= gr < matrix.shape[0] and 0 <= gc < matrix.shape[1]
            value = matrix[gr, gc] if inside else fill
            address = 2 * (r * box_cols + c)
            address ^= ((address >> 7) & (chunks - 1)) << 4
            out[address:address + 2] = np.frombuffer(np.uint16(value).tobytes(), dtype=np.uint8)
    return out


@pytest.mark.parametrize("nan_fill", [0, 1], ids=["zero-fill", "nan-fill"])
@pytest.mark.parametrize("swizzle, box_cols", [(0, 24), (1, 16), (2, 32), (3, 64)],
                         ids=["none", "32B", "64B", "128B"])
@pytest.mark.parametrize("x, y", [(0, 0), (40, 13), (-8, -3)], ids=["corner", "overhanging", "negative"])
def test_tma_box_lands_swizzled_at_the_wait(lib, swizzle, box_cols, nan_fill, x, y):
    matrix = (np.arange(21 * 72, dtype=np.uint32).reshape(21, 72) * 7 + 1).astype(np.uint16)  # 21 x 72 bf16
    rc, before, after, waits = tma_box(lib, matrix, 16, box_cols, swizzle, nan_fill, x, y)
    assert rc == 0
    assert (before == 0xFF).all(), "box bytes landed before any thread waited on the barrier"
    want = expected_box(matrix, 16, box_cols, swizzle, nan_fill, x, y)
    assert (after == want).all(), np.argwhere(after != want)[:8].ravel()
    # parity 1 names the phase before the first: complete; phase 0 completes with the copy's bytes
    assert waits.tolist() == [1, 0, 1, 0]


@pytest.mark.parametrize("case, kwargs", [
    ("row stride not a multiple of 16 bytes", dict(row_bytes=136)),
    ("box row shorter than the 128-byte swizzle (not emulated)", dict(swizzle=3, box_cols=32)),
    ("box wider than 256", dict(box_cols=264)),
])
def test_the_encoder_refuses_maps_it_cannot_copy(lib, case, kwargs):
    matrix = np.zeros((8, 272), dtype=np.uint16)
    args = dict(box_rows=8, box_cols=64, swizzle=0, nan_fill=0, x=0, y=0) | kwargs
    row_bytes = args.pop("row_bytes", None)
    assert tma_box(lib, matrix, **args, row_bytes=row_bytes)[0] == 1, case
