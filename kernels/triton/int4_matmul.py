"""Triton W4A16 GEMM: out = x @ dequant(W)ᵀ with the int4 decode fused into a tiled GEMM, fp32 accumulation.

Each program computes one BLOCK_M × BLOCK_N tile of out over one K slice (SPLIT_K slices in all). Per
BLOCK_K step it loads a (BLOCK_K/2, BLOCK_N) tile of packed bytes — every weight byte is read from global
memory once per M tile — splits each byte into its two nibbles, interleaves them back into K order, subtracts
the zero point and multiplies by the scale in registers, and feeds the dequantized tile to a tensor-core dot
with the x tile (fp32 activations: a tf32 dot on a GPU, as torch's allow_tf32 matmuls; the ieee fp32 dot
ran on the FMA units and its 128x128 prefill tile spilled 0.4-10.8 KB per thread).
When BLOCK_K divides the group size, a K step lies in one group and its scales/zeros are a
single (1, BLOCK_N) row; otherwise (per-channel groups of odd multiples) they are gathered per element.
Split-K (for decode, where M is tiny and N / BLOCK_N programs cannot fill the GPU) writes fp32 partial tiles
that one torch sum reduces.

With USE_TMA (sm_90+, GPUFORGE_TRITON_TMA=1, K a multiple of 32 and x's rows 16-byte aligned) the x tile and the
packed-byte tile are bulk tensor copies (UTMALDG) through device-side tensor descriptors, which zero-fill past M,
N and K, and on sm_90 the dot is wgmma (HGMMA); the decode in registers is the same.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gpuforge.kernels import _alloc
from gpuforge.kernels.triton._host import interpreted, tma_enabled, upcast_bf16_dot
from gpuforge.kernels.triton.matmul_tma import _scratch_on


@triton.jit
def _int4_matmul_kernel(
    x_ptr,  # activations (M, K), contiguous, fp16/bf16/fp32
    qw_ptr,  # packed codes uint8 (N, K/2): byte j of row n holds k = 2j (low nibble) and k = 2j+1 (high)
    scales_ptr,  # per-group scales (N, K/GROUP_SIZE), fp16/bf16/fp32
    zeros_ptr,  # per-group zero points uint8 (N, K/GROUP_SIZE)
    out_ptr,  # (SPLIT_K, M, N) contiguous: the output itself when SPLIT_K == 1, else fp32 partial sums
    M, N, K,
    GROUP_SIZE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,  # "tf32" for fp32 activations on a GPU, "ieee" otherwise (16-bit: unused)
    UPCAST_OPERANDS: tl.constexpr,  # dot in fp32: the interpreter's bf16-dot workaround (_host.py)
    USE_TMA: tl.constexpr,  # x and the packed bytes through tensor descriptors (bulk tensor copies)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_m % M  # wrap past the edge: in bounds without masks in the loop, never stored
    cols = offs_n % N
    half_k = K // 2
    n_groups = K // GROUP_SIZE
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, K)

    offs_kk = tl.arange(0, BLOCK_K)  # K offsets of a step, in order
    offs_kb = tl.arange(0, BLOCK_K // 2)  # byte offsets of a step
    if USE_TMA:
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
        qw_desc = tl.make_tensor_descriptor(qw_ptr, shape=[N, half_k], strides=[half_k, 1],
                                            block_shape=[BLOCK_N, BLOCK_K // 2])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        if USE_TMA:  # a split's slices are whole BLOCK_K steps, so only K's own end is past the data: zeros
            k32 = tl.cast(k0, tl.int32)  # descriptor coordinates are 32-bit
            x = x_desc.load([tl.program_id(0) * BLOCK_M, k32])
            packed = tl.trans(qw_desc.load([tl.program_id(1) * BLOCK_N, k32 // 2]))
        else:
            k_mask = (k0 + offs_kk) < k_end
            x = tl.load(x_ptr + rows[:, None] * K + (k0 + offs_kk)[None, :], mask=k_mask[None, :], other=0.0)
            byte_mask = (k0 // 2 + offs_kb) < k_end // 2
            byte_ptrs = qw_ptr + cols[None, :] * half_k + (k0 // 2 + offs_kb)[:, None]
            packed = tl.load(byte_ptrs, mask=byte_mask[:, None], other=0)
        low = (packed & 0xF).to(tl.float32)
        high = (packed >> 4).to(tl.float32)
        # (BLOCK_K/2, BLOCK_N, 2) -> (BLOCK_K/2, 2, BLOCK_N) -> (BLOCK_K, BLOCK_N): row 2j low, 2j+1 high
        codes = tl.reshape(tl.permute(tl.join(low, high), (0, 2, 1)), (BLOCK_K, BLOCK_N))
        if GROUP_SIZE % BLOCK_K == 0:
            group = k0 // GROUP_SIZE
            scale = tl.load(scales_ptr + cols * n_groups + group).to(tl.float32)[None, :]
            zero = tl.load(zeros_ptr + cols * n_groups + group).to(tl.float32)[None, :]
        else:
            group = tl.minimum((k0 + offs_kk) // GROUP_SIZE, n_groups - 1)[:, None]
            scale = tl.load(scales_ptr + cols[None, :] * n_groups + group).to(tl.float32)
            zero = tl.load(zeros_ptr + cols[None, :] * n_groups + group).to(tl.float32)
        w = ((codes - zero) * scale).to(x_ptr.dtype.element_ty)
        if UPCAST_OPERANDS:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _wide_fp32(x: torch.Tensor, block_k: int) -> bool:
    """fp32 activations in 32-wide K steps on Blackwell (compute capability 10+): see _tiles."""
    return (x.dtype == torch.float32 and block_k == 32 and x.device.type == "cuda"
            and torch.cuda.get_device_capability(x.device)[0] >= 10)


def _block_k(group_size: int, k: int) -> int:
    """The largest of 64/32/16 dividing the group size (one scale row per step); else 32 with gathers."""
    for block in (64, 32, 16):
        if group_size % block == 0:
            return block
    return 32


def _tiles(m: int, n: int, k: int, wide_fp32: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, SPLIT_K): small M gets thin tiles and split-K to fill the GPU. wide_fp32
    doubles the warps of the M > 16 tiles: for fp32 activations in 32-wide K steps on Blackwell (_wide_fp32),
    where with the usual count ptxas capped the registers for occupancy and spilled 8-16 B (sm_100's tf32
    tcgen05 path; the 64-wide steps compile clean and spill 192 B with twice the warps)."""
    if wide_fp32 and m > 16 and not interpreted():
        block_m, block_n, warps, split = _tiles(m, n, k)
        return block_m, block_n, 2 * warps, split
    if interpreted():
        return 16, 32, 4, 2 if k >= 256 else 1
    if m <= 16:
        tiles_n = triton.cdiv(n, 64)
        split = 1
        while tiles_n * split < 264 and k // (split * 2) >= 512:
            split *= 2
        return 16, 64, 4, split
    if m <= 64:
        return 64, 64, 4, 1
    return 128, 128, 8, 1


def forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
            group_size: int) -> torch.Tensor:
    """x (M, K) contiguous, qweight uint8 (N, K/2), scales/zeros (N, K/group_size) -> (M, N) in x's dtype."""
    m, k = x.shape
    n = qweight.shape[0]
    block_k = _block_k(group_size, k)
    block_m, block_n, warps, split = _tiles(m, n, k, _wide_fp32(x, block_k))
    if split == 1:
        out = _alloc.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        out = _alloc.empty((split, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n), split)
    precision = "tf32" if x.dtype == torch.float32 and not interpreted() else "ieee"
    use_tma = tma_enabled(x.device) and descriptors_fit(x, qweight)
    if use_tma:
        triton.set_allocator(_scratch_on(x.device))
    _int4_matmul_kernel[grid](x, qweight, scales, zeros, out, m, n, k, GROUP_SIZE=group_size,
                              INPUT_PRECISION=precision, UPCAST_OPERANDS=upcast_bf16_dot(x.dtype), USE_TMA=use_tma,
                              BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, num_warps=warps,
                              num_stages=1 if interpreted() else 3)
    return out if split == 1 else out.sum(dim=0).to(x.dtype)


def descriptors_fit(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """What the tensor descriptors need: 16-byte aligned bases and row strides (K a multiple of 32, so that the
    packed rows of K/2 bytes are too), both contiguous."""
    k = x.shape[1]
    return (x.is_contiguous() and qweight.is_contiguous() and k % 32 == 0 and x.data_ptr() % 16 == 0
            and qweight.data_ptr() % 16 == 0)


def compile_variants() -> list:
    """Each tile regime of `_tiles` (decode M <= 16 with split-K, M <= 64, prefill), for group sizes 32 and 128
    and activations fp16/bf16/fp32 (tf32 dot) (kernels/triton/_variants.py). Decode at M = 1 is specialised by the JIT
    (an int equal to 1), so it is its own variant."""
    from gpuforge.kernels.triton._variants import Variant, signature

    out = []
    regimes = [("decode M=1", 1, 4096, 4096), ("decode M=16", 16, 4096, 4096), ("M=64", 64, 4096, 4096),
               ("prefill", 2048, 4096, 4096)]
    for dtype in ("float16", "bfloat16", "float32"):
        for label, m, n, k in regimes:
            block_m, block_n, usual_warps, split = _tiles(m, n, k)
            for group in (32, 128):
                # fp32 activations in 32-wide K steps above decode: Blackwell launches its own (wider) warp count
                wide = dtype == "float32" and m > 16 and _block_k(group, k) == 32
                by_arch = [((80, 90), usual_warps), ((100,), _tiles(m, n, k, True)[2])] if wide else \
                    [((), usual_warps)]
                for archs, warps in by_arch:
                    # the descriptor form of the 16-bit prefill, for sm_90+ (what tma_enabled lets launch)
                    for use_tma in (False, True) if label == "prefill" and dtype != "float32" else (False,):
                        constexprs = {"GROUP_SIZE": group, "INPUT_PRECISION": "tf32" if dtype == "float32" else "ieee",
                                      "UPCAST_OPERANDS": False, "USE_TMA": use_tma, "BLOCK_M": block_m,
                                      "BLOCK_N": block_n, "BLOCK_K": _block_k(group, k), "SPLIT_K": split}
                        pointers = {"x_ptr": dtype, "qw_ptr": "uint8", "scales_ptr": dtype, "zeros_ptr": "uint8",
                                    "out_ptr": dtype if split == 1 else "float32"}
                        sig = signature(_int4_matmul_kernel, constexprs, pointers, ones=("M",) if m == 1 else ())
                        out.append(Variant("int4_matmul", _int4_matmul_kernel, sig, constexprs, warps, 3,
                                           f"{dtype} {label} {block_m}x{block_n}x{constexprs['BLOCK_K']} g{group} "
                                           f"split{split}" + (" tma" if use_tma else "")
                                           + (f" w{warps}" if wide else ""),
                                           tensor_cores=block_m >= 64, async_copies=block_m >= 64, tma=use_tma,
                                           archs=(90, 100) if use_tma else archs))
    return out
