"""Triton persistent matmul on tensor descriptors (TMA) for Hopper and later: C = A @ B, fp16/bf16, fp32 accumulation.

One program per SM walks the output tiles (BLOCK_M × BLOCK_N) in grouped order with a stride of the grid size,
so the launch is a single wave and the next tile's loads start while the last tile's epilogue finishes
(`tl.range(..., flatten=True)` fuses the tile and K loops into one software pipeline). A, B and C are read and
written through device-side tensor descriptors: on sm_90 each BLOCK_M × BLOCK_K / BLOCK_K × BLOCK_N slab is one
bulk tensor copy (UTMALDG) into swizzled shared memory, `num_stages` deep, completing on an mbarrier, and the dot
lowers to wgmma (HGMMA) reading both operands from shared memory; the accumulator stays in registers and the
C tile leaves through shared memory by a bulk tensor store (UTMASTG). On Blackwell (sm_100) the tile loop is also
warp-specialised (`warp_specialize=True`: Triton splits it into load and MMA partitions); Triton 3.x offers that
on Blackwell only, so on sm_90 the loop stays one software pipeline. On sm_80 the same code lowers to ordinary
pointer loads; it is meant for sm_90+, where kernels/triton/matmul.py's host wrapper sends it contiguous
16-bit operands whose rows are 16-byte aligned (TMA's requirement).

The descriptors bound-check every box, so edge tiles need no masks: out-of-range rows and columns read as zero
and are not written.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc
from gpuforge.kernels.triton._host import interpreted, upcast_bf16_dot

# BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps: 128×128 and 128×256 tiles with one or two warpgroups, the
# shapes Hopper's wgmma (m64 per warpgroup) and the 227 KB of shared memory per block favour.
TILES = [(128, 256, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 4, 4), (128, 64, 64, 4, 4),
         (64, 128, 64, 4, 4)]
ALIGN_BYTES = 16  # a tensor descriptor's strides and base address


def configs(interpreter: bool) -> list[triton.Config]:
    if interpreter:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4,
                              num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in TILES]


@triton.jit
def _tile_coordinates(tile, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Grouped order: GROUP_M consecutive tiles sweep down a column of C, so the B slabs stay in L2."""
    tiles_in_group = GROUP_M * num_pid_n
    first_m = (tile // tiles_in_group) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    return first_m + (tile % tiles_in_group) % group_m, (tile % tiles_in_group) // group_m


@triton.jit
def _matmul_tma_kernel(
    a_ptr,  # A (M, K), row-major, rows 16-byte aligned
    b_ptr,  # B (K, N), row-major, rows 16-byte aligned
    c_ptr,  # C (M, N), row-major: each element written once
    M, N, K,
    NUM_PROGRAMS: tl.constexpr,  # the grid: one program per SM
    UPCAST_OPERANDS: tl.constexpr,  # dot in fp32 (exact for bf16 operands): interpreter bf16-dot workaround
    WARP_SPECIALIZE: tl.constexpr,  # producer/consumer warp partitions of the tile loop (where Triton offers it)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    b_desc = tl.make_tensor_descriptor(b_ptr, shape=[K, N], strides=[N, 1], block_shape=[BLOCK_K, BLOCK_N])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_PROGRAMS, flatten=True,
                         warp_specialize=WARP_SPECIALIZE):
        pid_m, pid_n = _tile_coordinates(tile, num_pid_m, num_pid_n, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kk in range(k_tiles):
            a = a_desc.load([pid_m * BLOCK_M, kk * BLOCK_K])
            b = b_desc.load([kk * BLOCK_K, pid_n * BLOCK_N])
            if UPCAST_OPERANDS:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))


def _scratch_on(device: torch.device):
    """The allocator Triton calls for the global memory that holds device-side tensor descriptors."""
    def allocate(size: int, alignment: int, stream) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)
    return allocate


@functools.cache
def _tuned(interpreter: bool):
    return triton.autotune(configs=configs(interpreter), key=["M", "N", "K"])(_matmul_tma_kernel)


def _warp_specialize(device: torch.device) -> bool:
    """Blackwell and later: the compute capabilities where Triton 3.x warp-specialises a loop."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 10


def _programs(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, so the persistent tile loop runs more than once


def accepts(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether (a, b) can go through tensor descriptors: 2-D, fp16/bf16, row-major with unit column stride,
    row strides and base addresses 16-byte aligned."""
    if a.dtype not in (torch.float16, torch.bfloat16) or a.dim() != 2 or b.dim() != 2:
        return False
    size = a.element_size()
    return all(t.stride(1) == 1 and (t.stride(0) * size) % ALIGN_BYTES == 0 and t.data_ptr() % ALIGN_BYTES == 0
               for t in (a, b)) and (b.shape[1] * size) % ALIGN_BYTES == 0


def forward(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (M, K) @ b (K, N) -> contiguous (M, N) in a's dtype; `accepts(a, b)` must hold (empty operands need not)."""
    if 0 in (*a.shape, b.shape[1]):
        return torch.zeros((a.shape[0], b.shape[1]), dtype=a.dtype, device=a.device)
    if not accepts(a, b):
        raise ValueError("a, b: the TMA matmul takes 2-D fp16/bf16 row-major operands with 16-byte aligned rows; "
                         f"got {a.dtype} {tuple(a.shape)} strides {a.stride()} and {tuple(b.shape)} {b.stride()}")
    m, k = a.shape
    n = b.shape[1]
    # a row stride larger than K (a slice of a wider matrix) is not what the descriptors assume
    a, b = a.contiguous(), b.contiguous()
    out = _alloc.empty((m, n), dtype=a.dtype, device=a.device)
    programs = min(_programs(a.device), triton.cdiv(m, 32) * triton.cdiv(n, 32))
    triton.set_allocator(_scratch_on(a.device))
    _tuned(interpreted())[(programs,)](a, b, out, m, n, k, NUM_PROGRAMS=programs,
                                       UPCAST_OPERANDS=upcast_bf16_dot(a.dtype),
                                       WARP_SPECIALIZE=_warp_specialize(a.device))
    return out


def compile_variants() -> list:
    """Every autotune configuration for fp16 and bf16 on contiguous operands (kernels/triton/_variants.py);
    sm_90 and later only (the point of the kernel is TMA and wgmma)."""
    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    for dtype in ("float16", "bfloat16"):
        for config in configs(interpreter=False):
            for specialized, archs in ((False, (90,)), (True, (100,))):  # what _warp_specialize picks on each
                constexprs = {**config.kwargs, "NUM_PROGRAMS": 132, "UPCAST_OPERANDS": False,
                              "WARP_SPECIALIZE": specialized}
                sig = signature(_matmul_tma_kernel, constexprs, {"a_ptr": dtype, "b_ptr": dtype, "c_ptr": dtype})
                tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                out.append(Variant("matmul", _matmul_tma_kernel, sig, constexprs, config.num_warps,
                                   config.num_stages,
                                   f"{dtype} {tile} w{config.num_warps} s{config.num_stages} tma persistent"
                                   + (" warp-specialized" if specialized else ""),
                                   tensor_cores=True, async_copies=True, tma=True, archs=archs))
    return out
