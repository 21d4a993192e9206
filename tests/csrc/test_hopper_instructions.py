"""The SIMT emulator's Hopper copy instructions (tests/csrc/simt/hopper.h) through a probe kernel written with
inline PTX as a CUDA kernel writes it (tests/csrc/simt/hopper_probe.cpp), against the PTX ISA's definitions
written out here in Python: a 2D tensor-map box (cp.async.bulk.tensor tile mode) lands in shared memory densely
packed, rows innermost, swizzled as the map says (the 16-byte chunk index XORed with the row within the 8-row
pattern), out-of-bounds elements zero or NaN; it lands only once a thread waits on its mbarrier, whose phase
parities follow try_wait.parity's definition; cuTensorMapEncodeTiled refuses what the driver refuses, and a box
row shorter than its swizzle span, which the driver allows and the emulator does not emulate. One wgmma
m64n16k16 reads A and B from shared memory laid out by the canonical layouts (K-major interleaved and 64 B; B
K-major 32 B, MN-major interleaved and 32 B), accumulates or not, and writes its accumulators only at its
wait_group. The 3D boxes, the tensor-map stores and the m64n128 wgmma run in test_matmul_wgmma_simt.py; the
address maps are checked against CuTe in test_ptx_layouts.py."""

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


# canonical layouts (PTX ISA, "shared memory matrix layout"), 16-bit elements: (mn, k) -> byte offset before the
# swizzle, for the layout code (0 none, 1 128 B, 2 64 B, 3 32 B) and the leading / stride byte offsets
SWIZZLE_CHUNKS = {0: 1, 1: 8, 2: 4, 3: 2}


def canonical_offset(mn_major, layout, lbo, sbo, mn, k):
    w = SWIZZLE_CHUNKS[layout]
    if not mn_major:
        if w == 1:  # 8x16-byte core matrices: 8 rows, the two 8-wide halves of k at LBO, 8-row groups at SBO
            return (mn % 8) * 16 + (mn // 8) * sbo + (k // 8) * lbo + (k % 8) * 2
        return (mn % 8) * 16 * w + (mn // 8) * sbo + k * 2  # rows of w chunks, 8-row groups at SBO
    if w == 1:  # core matrices of 8 k-rows x 8 contiguous mn, mn groups at SBO, k groups at LBO
        return (mn % 8) * 2 + (mn // 8) * sbo + (k % 8) * 16 + (k // 8) * lbo
    return (mn // (8 * w)) * lbo + (mn % (8 * w)) * 2 + (k % 8) * 16 * w + (k // 8) * sbo


def place(image, base, matrix_bits, mn_major, layout, lbo, sbo):
    """Writes matrix_bits (MN x 16 bf16 bit patterns) into image at `base` and returns its descriptor."""
    chunks = SWIZZLE_CHUNKS[layout]
    for mn in range(matrix_bits.shape[0]):
        for k in range(16):
            address = base + canonical_offset(mn_major, layout, lbo, sbo, mn, k)
            address ^= ((address >> 7) & (chunks - 1)) << 4
            image[address:address + 2] = np.frombuffer(matrix_bits[mn, k].tobytes(), dtype=np.uint8)
    return (base >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (layout << 62)


A_LAYOUTS = {"A K-major none": (0, 128, 256), "A K-major 64B": (2, 16, 512)}
B_LAYOUTS = {"B K-major 32B": (False, 3, 16, 256), "B MN-major none": (True, 0, 256, 128),
             "B MN-major 32B": (True, 3, 1024, 256)}


@pytest.mark.parametrize("accumulate", [0, 1], ids=["overwrite", "accumulate"])
@pytest.mark.parametrize("b_layout", list(B_LAYOUTS))
@pytest.mark.parametrize("a_layout", list(A_LAYOUTS))
def test_wgmma_reads_its_descriptors_and_writes_at_the_wait(lib, a_layout, b_layout, accumulate):
    import torch

    gen = torch.Generator().manual_seed(len(a_layout) * 7 + len(b_layout))
    a = torch.randn(64, 16, generator=gen).to(torch.bfloat16)
    b = torch.randn(16, 16, generator=gen).to(torch.bfloat16)  # B^T: (n, k)
    image = np.zeros(8192, dtype=np.uint8)
    desc_a = place(image, 0, a.view(torch.int16).numpy().view(np.uint16), False, *A_LAYOUTS[a_layout])
    b_mn_major, *b_rest = B_LAYOUTS[b_layout]
    desc_b = place(image, 4096, b.view(torch.int16).numpy().view(np.uint16), b_mn_major, *b_rest)
    before, after = np.zeros(128 * 8, dtype=np.float32), np.zeros(128 * 8, dtype=np.float32)
    initial = 0.5 * np.arange(128 * 8, dtype=np.float32)
    assert lib.gf_simt_wgmma(image.ctypes.data_as(ctypes.c_void_p), image.size, ctypes.c_ulonglong(desc_a),
                             ctypes.c_ulonglong(desc_b), int(b_mn_major), accumulate,
                             before.ctypes.data_as(ctypes.c_void_p), after.ctypes.data_as(ctypes.c_void_p)) == 0
    assert (before == initial).all(), "accumulators changed before wgmma.wait_group"
    product = a.double().numpy() @ b.double().numpy().T
    for thread in range(128):
        warp, g, t = thread // 32, (thread % 32) // 4, thread % 4
        for v in range(8):  # m64nN accumulator map: mma.sync's 16x8 C fragment per warp, every 8 columns
            row, col = 16 * warp + g + 8 * ((v // 2) % 2), 8 * (v // 4) + 2 * t + v % 2
            want = product[row, col] + (initial[8 * thread + v] if accumulate else 0.0)
            assert abs(after[8 * thread + v] - want) <= 1e-5 * max(1.0, abs(want)), (thread, v)
