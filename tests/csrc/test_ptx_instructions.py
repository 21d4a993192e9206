"""The SIMT emulator's PTX (tests/csrc/simt/ptx.h) instruction by instruction, through probe kernels written with
inline PTX as a CUDA kernel writes it (tests/csrc/simt/ptx_probe.cpp), against the PTX ISA's definitions
written out here in Python: ldmatrix x1/x2/x4 with and without .trans (every lane and register), and cp.async
of 4, 8 and 16 bytes with partial sources (zero fill), landing only when wait_group lets its group complete.
The tensor-core kernels themselves run in test_matmul_simt.py and test_attention_simt.py; the fragment maps are
checked against CuTe in test_ptx_layouts.py."""

import ctypes

import numpy as np
import pytest


@pytest.fixture(scope="module")
def lib(simt_lib):
    return simt_lib("ptx_probe")


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
@pytest.mark.parametrize("matrices", [1, 2, 4])
def test_ldmatrix(lib, matrices, trans):
    pitch = 24  # halves per shared-memory row: rows are 48 bytes apart, 16-byte aligned
    data = np.arange(matrices * 8 * pitch, dtype=np.uint16) * 7 + 3
    out = np.zeros(32 * 4, dtype=np.uint32)
    assert lib.gf_simt_ldmatrix(matrices, int(trans), data.ctypes.data_as(ctypes.c_void_p), pitch,
                                out.ctypes.data_as(ctypes.c_void_p)) == 0
    rows = data.reshape(matrices * 8, pitch)[:, :8].reshape(matrices, 8, 8)  # matrix i = rows 8i .. 8i+7
    for lane in range(32):
        for reg in range(4):
            got = int(out[lane * 4 + reg])
            if reg >= matrices:
                assert got == 0
                continue
            m = rows[reg].T if trans else rows[reg]  # register i of lane l: row l // 4, cols 2 (l % 4) .. +1
            want = int(m[lane // 4, 2 * (lane % 4)]) | (int(m[lane // 4, 2 * (lane % 4) + 1]) << 16)
            assert got == want, (lane, reg, hex(got), hex(want))


@pytest.mark.parametrize("size, a_bytes", [(4, 4), (8, 8), (8, 3), (16, 16), (16, 0), (16, 9)])
def test_cp_async_groups_land_at_their_wait(lib, size, a_bytes):
    src = (np.arange(32 * 32, dtype=np.uint64) * 13 % 251).astype(np.uint8)
    out = np.zeros(3 * 32 * 32, dtype=np.uint8)
    assert lib.gf_simt_cp_async(src.ctypes.data_as(ctypes.c_void_p), size, a_bytes,
                                out.ctypes.data_as(ctypes.c_void_p)) == 0
    snapshots = out.reshape(3, 32, 2, 16)
    for lane in range(32):
        mine = src[lane * 32:(lane + 1) * 32]
        slot_a = np.full(16, 0xAB, dtype=np.uint8)
        slot_a[:size] = 0
        slot_a[:a_bytes] = mine[:a_bytes]  # src_size bytes read, the rest of the copy zero-filled
        untouched = np.full(16, 0xAB, dtype=np.uint8)
        # before any wait nothing has landed; wait_group 1 completes the older group (A); wait_group 0 both
        assert (snapshots[0, lane, 0] == untouched).all() and (snapshots[0, lane, 1] == untouched).all()
        assert (snapshots[1, lane, 0] == slot_a).all() and (snapshots[1, lane, 1] == untouched).all()
        assert (snapshots[2, lane, 0] == slot_a).all() and (snapshots[2, lane, 1] == mine[16:]).all()


def test_an_unknown_instruction_fails_the_build():
    """Nothing is emulated silently: PTX the emulator does not know is a build error naming it."""
    from tests.csrc.simt_build import translate_ptx

    with pytest.raises(ValueError, match="no emulation of the PTX instruction 'tcgen05.fence::before_thread_sync'"):
        translate_ptx('asm volatile("tcgen05.fence::before_thread_sync;\\n" ::);')
