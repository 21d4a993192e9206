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

`forward_fp8` runs the same kernel on fp8 e4m3 operands: A (M, K) and B given as Bᵀ (N, K), both K-major as
Hopper's fp8 wgmma reads them, fp32 accumulation, the scales of A (per tensor or per row) and of B (per tensor or
per column) applied to the accumulator once, in the epilogue, and a bf16/fp16 result.
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


# fp8: 128-wide K slabs (128 bytes, one swizzle row), the wgmma k32 steps of 8-bit operands.
TILES_FP8 = [(128, 256, 128, 3, 8), (128, 128, 128, 4, 8), (128, 128, 128, 4, 4)]


def configs(interpreter: bool, fp8: bool = False) -> list[triton.Config]:
    if interpreter:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 8}, num_warps=4,
                              num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
            for bm, bn, bk, s, w in (TILES_FP8 if fp8 else TILES)]


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
    b_ptr,  # B (K, N) row-major, or with B_KMAJOR Bᵀ (N, K) row-major; rows 16-byte aligned
    c_ptr,  # C (M, N), row-major: each element written once
    a_scale_ptr, b_scale_ptr,  # fp32 scales of A (A_SCALE) and B (B_SCALE), or None
    M, N, K,
    NUM_PROGRAMS: tl.constexpr,  # the grid: one program per SM
    UPCAST_OPERANDS: tl.constexpr,  # dot in fp32 (exact for bf16/fp8 operands): interpreter dot workaround
    WARP_SPECIALIZE: tl.constexpr,  # producer/consumer warp partitions of the tile loop (where Triton offers it)
    B_KMAJOR: tl.constexpr,  # B comes as Bᵀ (N, K): K contiguous in both operands, as fp8 wgmma needs
    A_SCALE: tl.constexpr, B_SCALE: tl.constexpr,  # 0: none, 1: one scale, 2: one per row of A / column of B
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    if B_KMAJOR:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
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
            if B_KMAJOR:
                b = tl.trans(b_desc.load([pid_n * BLOCK_N, kk * BLOCK_K]))
            else:
                b = b_desc.load([kk * BLOCK_K, pid_n * BLOCK_N])
            if UPCAST_OPERANDS:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        acc = _scaled(acc, a_scale_ptr, b_scale_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N, M, N, A_SCALE, B_SCALE,
                      BLOCK_M, BLOCK_N)
        c_desc.store([pid_m * BLOCK_M, pid_n * BLOCK_N], acc.to(c_desc.dtype))


@triton.jit
def _scaled(acc, a_scale_ptr, b_scale_ptr, m0, n0, M, N, A_SCALE: tl.constexpr, B_SCALE: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc times A's scale (one, or per row) and B's (one, or per column): the fp8 dequantisation, once per tile."""
    if A_SCALE == 1:
        acc = acc * tl.load(a_scale_ptr)
    if A_SCALE == 2:
        rows = m0 + tl.arange(0, BLOCK_M)
        acc = acc * tl.load(a_scale_ptr + rows, mask=rows < M, other=0.0)[:, None]
    if B_SCALE == 1:
        acc = acc * tl.load(b_scale_ptr)
    if B_SCALE == 2:
        cols = n0 + tl.arange(0, BLOCK_N)
        acc = acc * tl.load(b_scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
    return acc


def _scratch_on(device: torch.device):
    """The allocator Triton calls for the global memory that holds device-side tensor descriptors."""
    def allocate(size: int, alignment: int, stream) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)
    return allocate


@functools.cache
def _tuned(interpreter: bool, fp8: bool = False):
    return triton.autotune(configs=configs(interpreter, fp8), key=["M", "N", "K"])(_matmul_tma_kernel)


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
    _tuned(interpreted())[(programs,)](a, b, out, None, None, m, n, k, NUM_PROGRAMS=programs,
                                       UPCAST_OPERANDS=upcast_bf16_dot(a.dtype),
                                       WARP_SPECIALIZE=_warp_specialize(a.device), B_KMAJOR=False, A_SCALE=0,
                                       B_SCALE=0)
    return out


FP8 = torch.float8_e4m3fn


def _scale_mode(scale: torch.Tensor, name: str, length: int, what: str) -> int:
    if not isinstance(scale, torch.Tensor) or scale.dtype != torch.float32 or scale.numel() not in (1, length):
        raise ValueError(f"{name}: expected a float32 tensor of 1 or {length} elements (one per {what}), got "
                         f"{scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__} "
                         f"{tuple(scale.shape) if isinstance(scale, torch.Tensor) else ''}")
    return 1 if scale.numel() == 1 else 2


def forward_fp8(a: torch.Tensor, b_t: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(a_scale · a) @ (b_scale · b_t)ᵀ in out_dtype: a (M, K) and b_t (N, K) fp8 e4m3 (torch.float8_e4m3fn),
    a_scale one float32 or one per row of a, b_scale one or one per row of b_t (a column of the product); fp32
    accumulation, the scales applied to the accumulator. K and N must be multiples of 16 and 8 (16-byte rows)."""
    if a.dtype != FP8 or b_t.dtype != FP8 or a.dim() != 2 or b_t.dim() != 2:
        raise ValueError(f"a, b_t: expected 2-D float8_e4m3fn tensors, got {a.dtype} {tuple(a.shape)} and "
                         f"{b_t.dtype} {tuple(b_t.shape)}")
    (m, k), n = a.shape, b_t.shape[0]
    if b_t.shape[1] != k:
        raise ValueError(f"b_t: expected (N, K={k}) (the transposed right operand), got {tuple(b_t.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"out_dtype: expected torch.bfloat16 or torch.float16, got {out_dtype}")
    if k % 16 or n % 8:
        raise ValueError(f"K ({k}) and N ({n}) must be multiples of 16 and 8: TMA needs 16-byte rows")
    modes = (_scale_mode(a_scale, "a_scale", m, "row of a"), _scale_mode(b_scale, "b_scale", n, "row of b_t"))
    if 0 in (m, n):
        return torch.zeros((m, n), dtype=out_dtype, device=a.device)
    a, b_t = a.contiguous(), b_t.contiguous()
    out = _alloc.empty((m, n), dtype=out_dtype, device=a.device)
    if k == 0:
        return out.zero_()
    programs = min(_programs(a.device), triton.cdiv(m, 32) * triton.cdiv(n, 32))
    triton.set_allocator(_scratch_on(a.device))
    _tuned(interpreted(), True)[(programs,)](a, b_t, out, a_scale.contiguous(), b_scale.contiguous(), m, n, k,
                                             NUM_PROGRAMS=programs, UPCAST_OPERANDS=interpreted(),
                                             WARP_SPECIALIZE=_warp_specialize(a.device), B_KMAJOR=True,
                                             A_SCALE=modes[0], B_SCALE=modes[1])
    return out


def compile_variants() -> list:
    """Every autotune configuration for fp16 and bf16 on contiguous operands (kernels/triton/_variants.py);
    sm_90 and later only (the point of the kernel is TMA and wgmma)."""
    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    for dtype in ("float16", "bfloat16", "float8_e4m3fn"):
        fp8 = dtype == "float8_e4m3fn"
        for config in configs(interpreter=False, fp8=fp8):
            for specialized, archs in ((False, (90,)), (True, (100,))):  # what _warp_specialize picks on each
                constexprs = {**config.kwargs, "NUM_PROGRAMS": 132, "UPCAST_OPERANDS": False,
                              "WARP_SPECIALIZE": specialized, "B_KMAJOR": fp8, "A_SCALE": 2 if fp8 else 0,
                              "B_SCALE": 2 if fp8 else 0}
                pointers = {"a_ptr": dtype, "b_ptr": dtype, "c_ptr": "bfloat16" if fp8 else dtype}
                if fp8:  # per-row and per-column scales: the epilogue's widest form
                    pointers |= {"a_scale_ptr": "float32", "b_scale_ptr": "float32"}
                else:
                    constexprs |= {"a_scale_ptr": None, "b_scale_ptr": None}
                sig = signature(_matmul_tma_kernel, constexprs, pointers)
                tile = "x".join(str(config.kwargs[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
                out.append(Variant("matmul", _matmul_tma_kernel, sig, constexprs, config.num_warps,
                                   config.num_stages,
                                   f"{dtype} {tile} w{config.num_warps} s{config.num_stages} tma persistent"
                                   + (" warp-specialized" if specialized else ""),
                                   tensor_cores=True, async_copies=True, tma=True, archs=archs))
    return out
