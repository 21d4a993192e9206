// Warp-level tensor-core helpers shared by the sm_80+ kernels (matmul.cu, flash_attention.cu): cp.async
// global -> shared copies, ldmatrix fragment loads, mma.sync.m16n8k16 with fp32 accumulators, paired stores.
// Header-only and NVRTC-compatible (no host includes).
//
// Fragment layouts (g = lane / 4, t = lane % 4), per PTX ISA for m16n8k16 with 16-bit inputs:
//   A (16x16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g)
//   C/D (16x8):     c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// ldmatrix.x4: lane l gives the address of row l % 8 of 8x8 matrix l / 8; register i of every lane receives
// row lane / 4, columns 2 (lane % 4) .. +1 of matrix i (.trans: of the transposed matrix).
#pragma once

#include "common.cuh"

namespace gpuforge {

__device__ __forceinline__ unsigned smem_address(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1 (.cg: each byte is used once per block); src_bytes = 0
// writes zeros without reading, which pads the edges of the matrices.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)); }

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(smem)));
}

// A tile of rows x kRowElems 16-bit values in shared memory, XOR-swizzled in 16-byte chunks (chunk ^ (row % 8)):
// the 8 row addresses of every ldmatrix, and the cp.async writes of 8 consecutive rows, hit 8 different 16-byte
// bank groups.
template <int kRowElems>
__device__ __forceinline__ int swizzled_offset(int row, int chunk) {
  return row * kRowElems + ((chunk ^ (row & 7)) * 8);
}

// Rows row0 .. row0 + kRows - 1 of a matrix of kRowElems-wide 16-bit rows (`stride` elements apart) into such a
// tile with cp.async, by all kThreads threads of the block (a warp copies whole rows: coalesced); rows at or past
// `rows` are zero-filled.
template <int kRows, int kRowElems, int kThreads, typename T>
__device__ __forceinline__ void cp_async_tile(T* tile, const T* src, long long stride, long long row0, long long rows) {
  constexpr int kChunks = kRowElems / 8;
  static_assert(kRows * kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int i = 0; i < kRows * kChunks / kThreads; ++i) {
    const int id = threadIdx.x + i * kThreads;
    const int row = id / kChunks, chunk = id % kChunks;
    const long long r = row0 + row;
    const bool in = r < rows;
    cp_async_16(tile + swizzled_offset<kRowElems>(row, chunk), in ? src + r * stride + chunk * 8 : src, in ? 16 : 0);
  }
}

// The shared-memory element (row, 16-byte chunk) whose address this lane gives to an ldmatrix.x4 over a 16x16
// block of a swizzled tile (add the block's first row and chunk):
//  - rows_first: matrices (rows 0-7, chunk 0), (rows 8-15, chunk 0), (rows 0-7, chunk 1), (rows 8-15, chunk 1):
//    the A fragment of rows = m, chunks = k (non-transposed), or with .trans the B fragments of two n8 tiles of
//    rows = k, chunks = n;
//  - chunks_first: (rows 0-7, chunk 0), (rows 0-7, chunk 1), (rows 8-15, chunk 0), (rows 8-15, chunk 1): the B
//    fragments of two n8 tiles of rows = n, chunks = k (non-transposed).
struct LdmatrixLane {
  int row, chunk;
};
__device__ __forceinline__ LdmatrixLane ldmatrix_rows_first(int lane) {
  return {(lane % 8) + 8 * ((lane / 8) % 2), lane / 16};
}
__device__ __forceinline__ LdmatrixLane ldmatrix_chunks_first(int lane) {
  return {(lane % 8) + 8 * (lane / 16), (lane / 8) % 2};
}

template <typename T> struct MmaType;
template <> struct MmaType<__half> { static constexpr bool kIsBf16 = false; };
template <> struct MmaType<__nv_bfloat16> { static constexpr bool kIsBf16 = true; };

// d += a (16x16, row) * b (16x8, col); fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (MmaType<T>::kIsBf16) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

__device__ __forceinline__ void store_pair(__half* p, float x, float y) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(x, y);
}
__device__ __forceinline__ void store_pair(__nv_bfloat16* p, float x, float y) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}


// Two fp32 values rounded to T and packed in one register (the low half first): an A-fragment register.
template <typename T>
__device__ __forceinline__ unsigned pack_pair(float x, float y) {
  if constexpr (MmaType<T>::kIsBf16) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(x, y);
    return *reinterpret_cast<const unsigned*>(&h);
  } else {
    const __half2 h = __floats2half2_rn(x, y);
    return *reinterpret_cast<const unsigned*>(&h);
  }
}

}  // namespace gpuforge
