"""Resident blocks and warps per SM from a kernel's registers, shared memory and threads, by architecture:
the CUDA occupancy calculation (registers allocated per warp in units of 256, 1 KB of shared memory reserved per
block by the driver, the per-block opt-in limit of shared memory)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    name: str
    registers_per_sm: int = 65536
    max_registers_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32
    shared_per_sm: int = 0  # bytes usable by blocks (the SM's carve-out maximum)
    shared_per_block: int = 0  # the opt-in maximum for one block
    reserved_shared_per_block: int = 1024


# A100 (sm_80): 164 KB per SM, 163 KB per block; H100 (sm_90) and B200 (sm_100): 228 KB per SM, 227 KB per block.
ARCHS = {
    80: Arch("sm_80", shared_per_sm=167936, shared_per_block=166912),
    90: Arch("sm_90", shared_per_sm=233472, shared_per_block=232448),
    100: Arch("sm_100", shared_per_sm=233472, shared_per_block=232448),
}


def occupancy(arch: Arch, regs_per_thread: int, shared_bytes: int, threads: int) -> dict[str, int | str]:
    """{"blocks", "warps", "limit"}: resident blocks and warps per SM and what limits them (registers, shared
    memory, threads, blocks); 0 blocks when one block cannot fit at all (then `limit` says why)."""
    warps = -(-threads // 32)
    if shared_bytes > arch.shared_per_block:
        return {"blocks": 0, "warps": 0, "limit": "shared memory per block"}
    if regs_per_thread > arch.max_registers_per_thread or threads > 1024:
        return {"blocks": 0, "warps": 0, "limit": "registers or threads per block"}
    regs_per_warp = -(-max(regs_per_thread, 1) * 32 // 256) * 256
    limits = {
        "registers": (arch.registers_per_sm // regs_per_warp) // warps,
        "shared memory": arch.shared_per_sm // (shared_bytes + arch.reserved_shared_per_block),
        "threads": arch.max_threads_per_sm // (warps * 32),
        "blocks": arch.max_blocks_per_sm,
    }
    limit = min(limits, key=limits.get)
    blocks = limits[limit]
    return {"blocks": blocks, "warps": blocks * warps, "limit": limit}
