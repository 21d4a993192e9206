"""The flash-attention autotune space (kernels/triton/flash_attention.py): (BLOCK_M, BLOCK_N, num_warps,
num_stages, archs) per kernel, padded head dim (BLOCK_D) and operand width (16-bit, or fp32 taken as tf32).

Every entry is one that `gpuforge inspect` compiled on each architecture it lists without a spill and within
shared memory; a tile that spilled or overflowed everywhere is not listed. sm_80 (A100: 164 KB of shared memory
per SM, mma.sync) and sm_90 (H100: 228 KB, wgmma, whose accumulators live in registers) disagree on some tiles,
so an entry names the architecture families that may pick it. A launch takes its family from
torch.cuda.get_device_capability at call time: 8.x -> 80, 9.0 and above -> 90. The register budget sets the
shape: a program keeps its own tile and fp32 accumulators in registers (forward and dQ: Q, O or dQ, BLOCK_M x
BLOCK_D; dK/dV: K, V, dK, dV, BLOCK_N x BLOCK_D), so the tiles shrink as BLOCK_D grows, and fp32 operands
(twice the bytes) shrink them again.
"""

from __future__ import annotations

SM80, SM90 = 80, 90
BOTH = (SM80, SM90)
ONLY_80, ONLY_90 = (SM80,), (SM90,)

# kernel -> (BLOCK_D, fp32 operands) -> [(BLOCK_M, BLOCK_N, num_warps, num_stages, archs)]. The dK/dV kernel has
# two lists: its atomic-dQ form also holds a BLOCK_M x BLOCK_D dQ slice and spills where the deterministic form
# does not. Entries for one family only are where the other spilled (in B per thread): sm_80's mma.sync tiles
# at 64x64 need more registers than wgmma's on sm_90 (16-bit dK/dV D64 64x64 w8: 3032 B on sm_80), and sm_90
# spilled a few fp32 tiles sm_80 holds.
TILES: dict[str, dict[tuple[int, bool], list[tuple[int, int, int, int, tuple[int, ...]]]]] = {
    "forward": {
        (32, False): [(128, 64, 4, 3, BOTH), (64, 64, 4, 3, BOTH), (128, 32, 4, 3, BOTH)],
        (64, False): [(128, 64, 4, 3, BOTH), (64, 64, 4, 3, BOTH), (128, 64, 8, 3, BOTH)],
        (128, False): [(128, 64, 8, 3, BOTH), (64, 64, 4, 3, BOTH), (128, 32, 8, 3, BOTH)],
        (256, False): [(64, 32, 4, 2, BOTH), (64, 64, 8, 2, BOTH), (128, 32, 8, 2, BOTH)],
        (32, True): [(64, 64, 4, 3, BOTH), (64, 32, 4, 3, BOTH)],
        (64, True): [(64, 64, 4, 2, BOTH), (64, 32, 4, 3, BOTH)],
        (128, True): [(64, 64, 8, 2, BOTH), (64, 32, 4, 2, ONLY_90)],  # sm_80: 16 B
        (256, True): [(32, 32, 4, 2, BOTH), (64, 32, 8, 2, BOTH)],
    },
    "dq": {
        (32, False): [(64, 64, 4, 2, BOTH), (64, 32, 4, 2, BOTH), (128, 64, 8, 2, BOTH)],
        (64, False): [(64, 32, 4, 2, BOTH), (64, 64, 8, 2, BOTH), (32, 64, 4, 2, BOTH),
                      (64, 64, 4, 2, ONLY_90), (128, 64, 8, 2, ONLY_90)],  # sm_80: 16 B, 8 B
        (128, False): [(64, 64, 4, 2, BOTH), (64, 32, 4, 2, BOTH), (64, 64, 8, 2, BOTH)],
        (256, False): [(32, 32, 4, 2, BOTH), (64, 32, 8, 2, BOTH), (32, 64, 4, 2, ONLY_80)],  # sm_90: 8 B
        (32, True): [(64, 32, 4, 2, BOTH), (64, 64, 8, 2, BOTH)],
        (64, True): [(64, 32, 4, 2, BOTH), (64, 64, 8, 2, ONLY_90)],  # sm_80: 48 B
        (128, True): [(64, 32, 8, 2, BOTH), (32, 32, 4, 2, BOTH)],
        (256, True): [(32, 32, 8, 2, BOTH), (16, 32, 4, 2, BOTH)],
    },
    "dkdv": {
        (32, False): [(32, 64, 4, 2, BOTH), (64, 64, 8, 2, BOTH), (32, 32, 4, 2, BOTH)],
        (64, False): [(32, 64, 4, 2, BOTH), (32, 32, 4, 2, BOTH), (64, 64, 8, 2, ONLY_90)],  # sm_80: 3032 B
        (128, False): [(32, 64, 8, 2, BOTH), (16, 64, 8, 2, BOTH)],
        (256, False): [(16, 32, 4, 2, BOTH), (16, 32, 8, 2, BOTH), (32, 32, 8, 2, BOTH)],
        (32, True): [(32, 32, 4, 2, BOTH), (32, 64, 8, 2, BOTH)],
        (64, True): [(32, 64, 8, 2, BOTH), (32, 32, 4, 2, ONLY_80)],  # sm_90: 24 B
        (128, True): [(16, 32, 4, 2, BOTH), (32, 32, 8, 2, BOTH), (16, 64, 8, 2, BOTH)],
        (256, True): [(16, 32, 8, 1, BOTH), (16, 16, 8, 2, BOTH)],  # 16x32 at 2 stages: 8 B on sm_80
    },
    "dkdv_atomic": {
        (32, False): [(32, 64, 4, 2, BOTH), (32, 32, 4, 2, BOTH), (64, 64, 8, 2, ONLY_90)],  # sm_80: 16 B
        (64, False): [(32, 32, 4, 2, BOTH), (32, 64, 4, 2, ONLY_90), (64, 64, 8, 2, ONLY_90)],  # sm_80: 56, 1272 B
        (128, False): [(32, 64, 8, 2, BOTH), (16, 64, 8, 2, BOTH)],
        (256, False): [(16, 32, 8, 2, BOTH), (32, 32, 8, 2, ONLY_90)],  # sm_80: 24 B; 16x32 w4: 64-72 B
        (32, True): [(32, 32, 4, 2, BOTH), (32, 64, 8, 2, BOTH)],
        (64, True): [(32, 32, 4, 2, BOTH), (32, 64, 8, 2, ONLY_90)],  # sm_80: 40 B
        (128, True): [(16, 32, 4, 2, BOTH), (32, 32, 8, 2, BOTH), (16, 64, 8, 2, ONLY_80)],  # sm_90: 80 B
        (256, True): [(16, 32, 8, 1, BOTH), (16, 16, 8, 2, ONLY_90)],  # sm_80: 16 B; 16x32 at 2 stages: 48-72 B
    },
}
# BLOCK_M of the backward's preprocess (rowsum(dO ⊙ O)): two BLOCK_M x BLOCK_D fp32 tiles over 4 warps (fp32
# D64 at 64 rows spilled 8 B on sm_90).
PREPROCESS_BLOCK_M = {32: 64, 64: 32, 128: 64, 256: 32}


def family(capability: tuple[int, int]) -> int:
    """The architecture family whose tiles a device of this compute capability launches."""
    return SM90 if capability[0] >= 9 else SM80


def tiles(kernel: str, block_d: int, fp32: bool, arch: int) -> list[tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of every configuration `arch` may pick."""
    return [(m, n, w, s) for m, n, w, s, archs in TILES[kernel][(block_d, fp32)] if arch in archs]
