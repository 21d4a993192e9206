"""The flash-attention autotune space: every head dim, operand width and architecture family has configurations,
and the launch picks the family from the compute capability."""

import pytest

from gpuforge.kernels.triton._attention_configs import SM80, SM90, TILES, family, tiles


@pytest.mark.parametrize("kernel", sorted(TILES))
@pytest.mark.parametrize("block_d", (32, 64, 128, 256))
@pytest.mark.parametrize("fp32", (False, True))
@pytest.mark.parametrize("arch", (SM80, SM90))
def test_every_launch_has_configurations(kernel, block_d, fp32, arch):
    configs = tiles(kernel, block_d, fp32, arch)
    assert configs and len(set(configs)) == len(configs)
    assert all(m >= 16 and n >= 16 and w in (4, 8) and s >= 1 for m, n, w, s in configs)


def test_family_of_a_compute_capability():
    assert [family(cc) for cc in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0))] == [SM80, SM80, SM80, SM90, SM90]
