// Batched matmul C[z] = A[z] @ B[z]: A (batch, M, K), B (batch, K, N) with arbitrary element strides (a batch
// stride of 0 broadcasts an operand), C (batch, M, N) contiguous. fp32 accumulation, one rounding on store.
//
// Two kernels:
//  - matmul_tiled_kernel: the readable baseline, every dtype, any strides. A 64x64 tile of C per block; each
//    K step stages a 64x16 slab of A and a 16x64 slab of B in shared memory (as fp32), and each of the 256
//    threads accumulates a 4x4 register tile from it, so every element loaded from global memory is reused
//    64 times from shared memory and 4 times from registers.
//  - matmul_mma_kernel: the tensor-core path for fp16/bf16 on sm_80+, for row-major operands whose rows are
//    16-byte aligned (K and N multiples of 8). A 128x128 tile of C per block of 8 warps (each warp 64x32);
//    32-wide K slabs stream through a 3-stage cp.async pipeline in shared memory (the loads of slab k+2 are in
//    flight while the tensor cores work on slab k), fragments come out of shared memory with ldmatrix, and
//    the products are warp-level mma.sync.m16n8k16 with fp32 accumulators held in registers.
#include "common.cuh"
#include "mma.cuh"

namespace gpuforge {

// ---------------------------------------------------------------------------------------------------------
// Baseline: shared-memory tiled kernel.
constexpr int kTiledBlockM = 64;
constexpr int kTiledBlockN = 64;
constexpr int kTiledBlockK = 16;
constexpr int kTiledThreads = 256;  // 16 x 16 threads, each computing 4 x 4 outputs

// Grid: (cdiv(M, 64) * cdiv(N, 64), batch). The flattened tile index keeps the grid within limits for any M.
template <typename T>
__global__ void __launch_bounds__(kTiledThreads)
matmul_tiled_kernel(const T* __restrict__ a,   // A, element (z, m, k) at z*sa_z + m*sa_m + k*sa_k
                    const T* __restrict__ b,   // B, element (z, k, n) at z*sb_z + k*sb_k + n*sb_n
                    T* __restrict__ c,         // C, contiguous (batch, M, N)
                    long long M, long long N, long long K,
                    long long sa_z, long long sa_m, long long sa_k,
                    long long sb_z, long long sb_k, long long sb_n) {
  // A is stored k-major ([k][m]) so the inner loop reads both tiles along a row: threads of a warp read
  // 16 consecutive B columns and broadcast A values, without bank conflicts. The extra column skews the
  // transposing stores (16 threads write one m at 16 different k) across banks instead of onto one.
  __shared__ float a_tile[kTiledBlockK][kTiledBlockM + 1];
  __shared__ float b_tile[kTiledBlockK][kTiledBlockN];

  const long long tiles_n = (N + kTiledBlockN - 1) / kTiledBlockN;
  const long long m0 = (blockIdx.x / tiles_n) * kTiledBlockM;
  const long long n0 = (blockIdx.x % tiles_n) * kTiledBlockN;
  const long long z = blockIdx.y;
  a += z * sa_z;
  b += z * sb_z;
  const int tx = threadIdx.x % 16;  // this thread's columns: n0 + tx + 16 j
  const int ty = threadIdx.x / 16;  // this thread's rows: m0 + ty + 16 i

  float acc[4][4] = {};
  for (long long k0 = 0; k0 < K; k0 += kTiledBlockK) {
    // 1024 elements of each slab, 4 per thread; elements past the edges load as 0 so the math needs no checks.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int e = threadIdx.x + i * kTiledThreads;
      const int ak = e % kTiledBlockK, am = e / kTiledBlockK;  // k fastest: coalesced for row-major A
      const long long gm = m0 + am, gk = k0 + ak;
      a_tile[ak][am] = (gm < M && gk < K) ? to_float(a[gm * sa_m + gk * sa_k]) : 0.0f;
      const int bn = e % kTiledBlockN, bk = e / kTiledBlockN;  // n fastest: coalesced for row-major B
      const long long gn = n0 + bn, gkb = k0 + bk;
      b_tile[bk][bn] = (gkb < K && gn < N) ? to_float(b[gkb * sb_k + gn * sb_n]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTiledBlockK; ++kk) {
      float a_reg[4], b_reg[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) a_reg[i] = a_tile[kk][ty + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) b_reg[j] = b_tile[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += a_reg[i] * b_reg[j];
    }
    __syncthreads();  // the next slab overwrites the tiles
  }
  T* c_batch = c + z * M * N;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const long long m = m0 + ty + 16 * i;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const long long n = n0 + tx + 16 * j;
      if (m < M && n < N) c_batch[m * N + n] = from_float<T>(acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Fast path: tensor cores (mma.sync m16n8k16), cp.async pipeline, ldmatrix, swizzled shared memory.
constexpr int kMmaBlockM = 128;
constexpr int kMmaBlockN = 128;
constexpr int kMmaBlockK = 32;
constexpr int kMmaStages = 3;      // 3 x 16 KiB of shared memory: the static limit, 2 slabs in flight
constexpr int kMmaThreads = 256;   // 8 warps: 2 along M x 4 along N, each a 64 x 32 tile of C
constexpr int kMmaGroupM = 8;      // grouped tile order: 8 row-tiles sweep the column-tiles together (L2 reuse)

// Shared-memory layouts, XOR-swizzled in 16-byte chunks so that the 8 row addresses of each ldmatrix (and
// the cp.async writes) fall into 8 different bank groups.
// A slab: 128 rows x 32 halves (4 chunks of 16 B per row); two rows share a 128-byte bank window.
__device__ __forceinline__ int a_smem_offset(int row, int chunk) {
  return row * kMmaBlockK + ((chunk ^ ((row >> 1) & 3)) * 8);
}
// B slab: 32 rows (k) x 128 halves (16 chunks per row); each row spans all banks twice.
__device__ __forceinline__ int b_smem_offset(int row, int chunk) {
  return row * kMmaBlockN + ((chunk ^ (row & 7)) * 8);
}

// Preconditions (checked by the launcher): sa_k == sb_n == 1; K, N, sa_m, sb_k, sa_z, sb_z multiples of 8;
// a and b 16-byte aligned. Grid: (cdiv(M, 128) * cdiv(N, 128), batch).
template <typename T>
__global__ void __launch_bounds__(kMmaThreads)
matmul_mma_kernel(const T* __restrict__ a,   // A, row (z, m) starts at z*sa_z + m*sa_m, K contiguous
                  const T* __restrict__ b,   // B, row (z, k) starts at z*sb_z + k*sb_k, N contiguous
                  T* __restrict__ c,         // C, contiguous (batch, M, N)
                  long long M, long long N, long long K,
                  long long sa_z, long long sa_m, long long sb_z, long long sb_k) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(128) T a_smem[kMmaStages][kMmaBlockM * kMmaBlockK];
  __shared__ __align__(128) T b_smem[kMmaStages][kMmaBlockK * kMmaBlockN];

  // Grouped order over the tile grid (as in the Triton kernel).
  const long long tiles_m = (M + kMmaBlockM - 1) / kMmaBlockM;
  const long long tiles_n = (N + kMmaBlockN - 1) / kMmaBlockN;
  const long long tiles_in_group = kMmaGroupM * tiles_n;
  const long long first_tile_m = (blockIdx.x / tiles_in_group) * kMmaGroupM;
  const long long group_rows = min(tiles_m - first_tile_m, (long long)kMmaGroupM);
  const long long tile_m = first_tile_m + (blockIdx.x % tiles_in_group) % group_rows;
  const long long tile_n = (blockIdx.x % tiles_in_group) / group_rows;
  const long long m0 = tile_m * kMmaBlockM, n0 = tile_n * kMmaBlockN;
  const long long z = blockIdx.y;
  a += z * sa_z;
  b += z * sb_z;

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int warp_m = warp / 4;  // rows warp_m*64 .. +63 of the block tile
  const int warp_n = warp % 4;  // columns warp_n*32 .. +31

  // Each thread copies 2 of the 512 16-byte chunks of each slab.
  auto load_slab = [&](int stage, long long k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int chunk_id = threadIdx.x + i * kMmaThreads;
      const int ar = chunk_id / 4, ac = chunk_id % 4;  // A: 128 rows x 4 chunks
      const long long gm = m0 + ar, gk = k0 + ac * 8;
      const bool a_in = gm < M && gk < K;
      cp_async_16(&a_smem[stage][a_smem_offset(ar, ac)], a_in ? a + gm * sa_m + gk : a, a_in ? 16 : 0);
      const int br = chunk_id / 16, bc = chunk_id % 16;  // B: 32 rows x 16 chunks
      const long long gkb = k0 + br, gn = n0 + bc * 8;
      const bool b_in = gkb < K && gn < N;
      cp_async_16(&b_smem[stage][b_smem_offset(br, bc)], b_in ? b + gkb * sb_k + gn : b, b_in ? 16 : 0);
    }
  };

  float acc[4][4][4] = {};  // [m16 tile][n8 tile][fragment]
  const long long num_slabs = (K + kMmaBlockK - 1) / kMmaBlockK;
#pragma unroll
  for (int s = 0; s < kMmaStages - 1; ++s) {
    if (s < num_slabs) load_slab(s, s * kMmaBlockK);
    cp_async_commit();  // one group per slab, empty or not, so the wait counts below stay exact
  }

  // ldmatrix row addresses: lane l gives row (l % 8) + 8 * ((l / 8) % 2) and 16-byte chunk l / 16 of a 16x16.
  const int frag_row = (lane % 8) + 8 * ((lane / 8) % 2);
  const int frag_chunk = lane / 16;

  for (long long slab = 0; slab < num_slabs; ++slab) {
    cp_async_wait<kMmaStages - 2>();  // this slab has landed (for this thread) ...
    __syncthreads();                  // ... for every thread, and every warp is done with slab - 1
    const long long next = slab + kMmaStages - 1;
    if (next < num_slabs) load_slab(next % kMmaStages, next * kMmaBlockK);  // reuses slab - 1's stage
    cp_async_commit();

    const T* as = a_smem[slab % kMmaStages];
    const T* bs = b_smem[slab % kMmaStages];
#pragma unroll
    for (int kk = 0; kk < kMmaBlockK / 16; ++kk) {
      unsigned a_frag[4][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        ldmatrix_x4(a_frag[mi], &as[a_smem_offset(warp_m * 64 + mi * 16 + frag_row, kk * 2 + frag_chunk)]);
      unsigned b_frag[2][4];  // [pair of n8 tiles]: {b0, b1} of tile 2p, then of tile 2p + 1
#pragma unroll
      for (int p = 0; p < 2; ++p)
        ldmatrix_x4_trans(b_frag[p], &bs[b_smem_offset(kk * 16 + frag_row, warp_n * 4 + p * 2 + frag_chunk)]);
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          mma_16x8x16<T>(acc[mi][ni], a_frag[mi], b_frag[ni / 2][(ni % 2) * 2], b_frag[ni / 2][(ni % 2) * 2 + 1]);
    }
  }
  cp_async_wait<0>();

  // Accumulator fragment: rows lane/4 and lane/4 + 8, columns 2*(lane%4) and +1 of each 16x8 tile. N is a
  // multiple of 8, so a column pair is either fully inside or fully outside the matrix.
  T* c_batch = c + z * M * N;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
      const long long n = n0 + warp_n * 32 + ni * 8 + 2 * (lane % 4);
      if (n >= N) continue;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const long long m = m0 + warp_m * 64 + mi * 16 + lane / 4 + 8 * half;
        if (m < M) store_pair(&c_batch[m * N + n], acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
      }
    }
  }
#endif
}

}  // namespace gpuforge

#ifndef __CUDACC_RTC__
#include <type_traits>

#include "launchers.h"

namespace gpuforge {

// The tensor-core kernel's preconditions: 16-bit type, sm_80+, rows contiguous and 16-byte aligned.
static bool mma_path_applies(DType dtype, const void* a, const void* b, int64_t N, int64_t K, int64_t sa_z,
                             int64_t sa_m, int64_t sa_k, int64_t sb_z, int64_t sb_k, int64_t sb_n) {
  if (dtype == DType::Float32) return false;
  if (sa_k != 1 || sb_n != 1 || !aligned16(a) || !aligned16(b)) return false;
  for (int64_t v : {N, K, sa_z, sa_m, sb_z, sb_k})
    if (v % 8 != 0) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

cudaError_t launch_matmul(const void* a, const void* b, void* c, int64_t M, int64_t N, int64_t K, int64_t batch,
                          int64_t sa_z, int64_t sa_m, int64_t sa_k, int64_t sb_z, int64_t sb_k, int64_t sb_n,
                          DType dtype, cudaStream_t stream) {
  if (M == 0 || N == 0 || batch == 0) return cudaSuccess;
  if (batch > 65535) return cudaErrorInvalidConfiguration;  // grid.y limit (bindings.cpp says so first)
  const bool fast = mma_path_applies(dtype, a, b, N, K, sa_z, sa_m, sa_k, sb_z, sb_k, sb_n);
  cudaGetLastError();  // a failed probe above must not be reported as this launch's error
  return GF_DISPATCH_FLOAT_TYPES(dtype, [&] {
    auto* pa = static_cast<const scalar_t*>(a);
    auto* pb = static_cast<const scalar_t*>(b);
    auto* pc = static_cast<scalar_t*>(c);
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (fast) {
        const long long tiles = ((M + kMmaBlockM - 1) / kMmaBlockM) * ((N + kMmaBlockN - 1) / kMmaBlockN);
        if (tiles > INT32_MAX) return cudaErrorInvalidConfiguration;
        matmul_mma_kernel<scalar_t><<<dim3((unsigned)tiles, (unsigned)batch), kMmaThreads, 0, stream>>>(
            pa, pb, pc, M, N, K, sa_z, sa_m, sb_z, sb_k);
        return cudaGetLastError();
      }
    }
    const long long tiles = ((M + kTiledBlockM - 1) / kTiledBlockM) * ((N + kTiledBlockN - 1) / kTiledBlockN);
    if (tiles > INT32_MAX) return cudaErrorInvalidConfiguration;
    matmul_tiled_kernel<scalar_t><<<dim3((unsigned)tiles, (unsigned)batch), kTiledThreads, 0, stream>>>(
        pa, pb, pc, M, N, K, sa_z, sa_m, sa_k, sb_z, sb_k, sb_n);
    return cudaGetLastError();
  });
}

}  // namespace gpuforge
#endif
