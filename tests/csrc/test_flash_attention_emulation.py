"""NumPy emulation of csrc/flash_attention.cu's tensor-core forward (flash_attention_fwd_mma_kernel).

Nothing CUDA runs in CI, so this replays the kernel's index math lane by lane: the cp.async tile copy into the
swizzled shared-memory layout, the ldmatrix lane addresses (and that they are free of bank conflicts), the
mma.sync.m16n8k16 fragment layouts (PTX ISA), the S-accumulator -> P-operand re-packing, the key-tile range
and element masks of the bottom-right aligned window, and the online softmax. The emulated output and LSE
are compared with a float64 softmax(QKᵀ·scale + mask)·V. Constants and formulas mirror the kernel's."""

import numpy as np
import pytest

BLOCK_M, BLOCK_N, THREADS, WARPS = 64, 64, 128, 4
LANE = np.arange(32)
G, T = LANE // 4, LANE % 4


def smem_offset(row, chunk, d):
    return row * d + ((chunk ^ (row & 7)) * 8)


def load_tile(src, n0, d):
    """cp.async copy of keys n0..n0+63 into the swizzled tile (zeros past the end); checks it is a bijection."""
    tile = np.full(BLOCK_N * d, np.nan)
    chunks = d // 8
    for i in range(BLOCK_N * chunks // THREADS):
        ids = np.arange(THREADS) + i * THREADS
        for row, chunk in zip(ids // chunks, ids % chunks, strict=True):
            off = smem_offset(row, chunk, d)
            assert np.isnan(tile[off:off + 8]).all(), "two chunks copied to one place"
            key = n0 + row
            tile[off:off + 8] = src[key, chunk * 8:chunk * 8 + 8] if key < len(src) else 0.0
    assert not np.isnan(tile).any()
    return tile


def ldmatrix_x4(smem, addr, trans):
    """Lane l addresses row l % 8 of matrix l // 8; register i of lane l holds row l // 4, cols 2 (l % 4)..+1."""
    for m in range(4):  # each 8-address phase must touch 8 different 16-byte bank groups (32 banks)
        assert len({(a * 2 // 16) % 8 for a in addr[8 * m:8 * m + 8]}) == 8, "bank conflict"
    mats = np.stack([np.stack([smem[a:a + 8] for a in addr[8 * m:8 * m + 8]]) for m in range(4)])
    if trans:
        mats = mats.transpose(0, 2, 1)
    return np.stack([mats[:, G, 2 * T], mats[:, G, 2 * T + 1]], axis=-1).transpose(1, 0, 2)  # (lane, reg, 2)


def mma(acc, a, b0, b1):
    """acc (32, 4) += A (16x16 from a (32, 4, 2)) @ B (16x8 from b0, b1 (32, 2)), fragment layouts of PTX."""
    A, B = np.zeros((16, 16)), np.zeros((16, 8))
    for r, (dr, dc) in enumerate(((0, 0), (8, 0), (0, 8), (8, 8))):
        A[G + dr, 2 * T + dc], A[G + dr, 2 * T + dc + 1] = a[:, r, 0], a[:, r, 1]
    B[2 * T, G], B[2 * T + 1, G], B[2 * T + 8, G], B[2 * T + 9, G] = b0[:, 0], b0[:, 1], b1[:, 0], b1[:, 1]
    C = A @ B
    return acc + np.stack([C[G, 2 * T], C[G, 2 * T + 1], C[G + 8, 2 * T], C[G + 8, 2 * T + 1]], axis=1)


def emulate(q, k, v, scale, wl, wr):
    """One (batch, head): q (Sq, D), k, v (Sk, D) -> out (Sq, D), lse (Sq,), as the kernel's blocks compute."""
    sq, d = q.shape
    sk = k.shape[0]
    out, lse = np.full((sq, d), np.nan), np.full(sq, np.nan)
    shift = sk - sq
    k_row, k_chunk = LANE % 8 + 8 * (LANE // 16), (LANE // 8) % 2
    v_row, v_chunk = LANE % 8 + 8 * ((LANE // 8) % 2), LANE // 16
    for m0 in range(0, sq, BLOCK_M):
        last_row = min(m0 + BLOCK_M, sq) - 1
        key_lo = 0 if wl < 0 else max(0, m0 + shift - wl)
        key_hi = sk if wr < 0 else min(sk, last_row + shift + wr + 1)
        tile_lo = key_lo // BLOCK_N
        tile_hi = -(-key_hi // BLOCK_N) if key_hi > key_lo else tile_lo
        tiles = {t: (load_tile(k, t * BLOCK_N, d), load_tile(v, t * BLOCK_N, d)) for t in range(tile_lo, tile_hi)}
        for warp in range(WARPS):
            row_a = m0 + warp * 16 + G
            rows = (row_a, row_a + 8)
            q_frag = np.zeros((d // 16, 32, 4, 2))
            for kk in range(d // 16):
                for r in range(4):
                    row, col = rows[r % 2], kk * 16 + 2 * T + 8 * (r // 2)
                    ok = row < sq
                    q_frag[kk, ok, r] = q[row[ok, None], col[ok, None] + np.arange(2)]
            o = np.zeros((d // 8, 32, 4))
            m_run, l_run = np.full((2, 32), -np.inf), np.zeros((2, 32))
            for tile in range(tile_lo, tile_hi):
                ks, vs = tiles[tile]
                n0 = tile * BLOCK_N
                s = np.zeros((BLOCK_N // 8, 32, 4))
                for kk in range(d // 16):
                    for p in range(BLOCK_N // 16):
                        kf = ldmatrix_x4(ks, smem_offset(p * 16 + k_row, kk * 2 + k_chunk, d), trans=False)
                        s[2 * p] = mma(s[2 * p], q_frag[kk], kf[:, 0], kf[:, 1])
                        s[2 * p + 1] = mma(s[2 * p + 1], q_frag[kk], kf[:, 2], kf[:, 3])
                s = s * scale * np.log2(np.e)
                masked = (n0 + BLOCK_N > sk or (wr >= 0 and n0 + BLOCK_N - 1 > m0 + shift + wr)
                          or (wl >= 0 and n0 < last_row + shift - wl))
                for j in range(BLOCK_N // 8):
                    for e in range(4):
                        key, diag = n0 + j * 8 + 2 * T + e % 2, rows[e // 2] + shift
                        visible = (key < sk) & ((wl < 0) | (key >= diag - wl)) & ((wr < 0) | (key <= diag + wr))
                        assert masked or visible.all(), "an unmasked tile holds a hidden key"
                        s[j, :, e] = np.where(visible, s[j, :, e], -np.inf)
                alpha = np.zeros((2, 32))
                for r in range(2):
                    mx = np.maximum(m_run[r], s[:, :, 2 * r:2 * r + 2].max(axis=(0, 2)))
                    mx = mx.reshape(8, 4).max(axis=1).repeat(4)  # quad_max over lanes 4g..4g+3
                    base = np.where(mx == -np.inf, 0.0, mx)
                    alpha[r] = np.exp2(m_run[r] - base)
                    m_run[r] = mx
                    s[:, :, 2 * r:2 * r + 2] = np.exp2(s[:, :, 2 * r:2 * r + 2] - base[:, None])
                    l_run[r] = l_run[r] * alpha[r] + s[:, :, 2 * r:2 * r + 2].sum(axis=(0, 2))
                o *= np.stack([alpha[0], alpha[0], alpha[1], alpha[1]], axis=1)
                ph = s.astype(np.float16).astype(np.float64)  # pack_pair rounds P to the input type
                for kk in range(BLOCK_N // 16):
                    pf = np.stack([ph[2 * kk][:, 0:2], ph[2 * kk][:, 2:4], ph[2 * kk + 1][:, 0:2],
                                   ph[2 * kk + 1][:, 2:4]], axis=1)
                    for p in range(d // 16):
                        vf = ldmatrix_x4(vs, smem_offset(kk * 16 + v_row, p * 2 + v_chunk, d), trans=True)
                        o[2 * p] = mma(o[2 * p], pf, vf[:, 0], vf[:, 1])
                        o[2 * p + 1] = mma(o[2 * p + 1], pf, vf[:, 2], vf[:, 3])
            for r in range(2):
                l_tot = l_run[r].reshape(8, 4).sum(axis=1).repeat(4)  # quad_sum
                inv = np.where(l_tot > 0, 1 / np.where(l_tot > 0, l_tot, 1), 0.0)
                for lane in range(32):
                    row = rows[r][lane]
                    if row >= sq:
                        continue
                    for j in range(d // 8):
                        out[row, j * 8 + 2 * T[lane] + np.arange(2)] = o[j, lane, 2 * r:2 * r + 2] * inv[lane]
                    lse[row] = m_run[r][lane] * np.log(2) + np.log(l_tot[lane]) if l_tot[lane] > 0 else -np.inf
    return out, lse


def reference(q, k, v, scale, wl, wr):
    sq, sk = q.shape[0], k.shape[0]
    i, j = np.arange(sq)[:, None] + sk - sq, np.arange(sk)[None, :]
    visible = np.ones((sq, sk), bool)
    if wl >= 0:
        visible &= j >= i - wl
    if wr >= 0:
        visible &= j <= i + wr
    s = np.where(visible, q @ k.T * scale, -np.inf)
    mx = s.max(axis=1, keepdims=True)
    mx = np.where(np.isfinite(mx), mx, 0.0)
    e = np.exp(s - mx)
    den = e.sum(axis=1, keepdims=True)
    out = np.where(den > 0, e @ v / np.where(den > 0, den, 1), 0.0)
    lse = np.where(den[:, 0] > 0, mx[:, 0] + np.log(np.where(den[:, 0] > 0, den[:, 0], 1)), -np.inf)
    return out, lse


@pytest.mark.parametrize("sq, sk, d, window", [
    (97, 97, 64, (-1, -1)),     # one full and one tail query tile, tail key tile
    (70, 130, 64, (-1, 0)),     # causal, Sq < Sk: bottom-right aligned, block skipping
    (130, 33, 64, (-1, 0)),     # causal, Sq > Sk: the first query rows see no key (zeros, LSE -inf)
    (65, 150, 64, (20, 3)),     # sliding window: tiles left of the window skipped, both edges masked
    (17, 17, 128, (-1, 0)),     # head dim 128, one partial tile
])
def test_emulated_kernel_matches_float64(sq, sk, d, window):
    rng = np.random.default_rng(sq * 1000 + sk)
    q, k, v = (rng.standard_normal((n, d)).astype(np.float16).astype(np.float64) for n in (sq, sk, sk))
    scale = d ** -0.5
    out, lse = emulate(q, k, v, scale, *window)
    ref_out, ref_lse = reference(q, k, v, scale, *window)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-9, atol=1e-9)
    assert np.abs(out - ref_out).max() <= 2e-3 * max(np.abs(ref_out).max(), 1e-30)
    if sq > sk and window == (-1, 0):
        assert (out[:sq - sk] == 0).all() and np.isneginf(lse[:sq - sk]).all()
