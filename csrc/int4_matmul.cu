// W4A16 GEMM: out (M, N) = x (M, K) @ dequant(W)ᵀ, W (N, K) stored as int4 codes, two per byte (low nibble =
// even k), with a scale (fp16/bf16/fp32) and a uint8 zero point per group of `group_size` input channels:
// W[n, k] = (q[n, k] - zero[n, k / G]) * scale[n, k / G]. Activations fp16 or bf16, fp32 accumulation.
//
// Two kernels:
// - decode (M <= 16): memory-bound, so every weight byte is read exactly once (a streaming 16-byte load per
//   thread per 32 codes) and the int4 -> fp16 conversion is a handful of bit operations, not 32 conversions.
//   One warp per output channel, split-K across blocks so that a few thousand output channels still fill
//   every SM; fp32 partial sums are reduced by a second small kernel.
// - tiled (any M): a plain shared-memory tiled GEMM that dequantizes each weight tile into shared memory.
//   Correct for every shape; not tuned (no tensor cores).
#include "common.cuh"

#ifndef __CUDACC_RTC__
#include <cstdint>
#endif

namespace gpuforge {

// --- int4 -> fp16 decode ------------------------------------------------------------------------------------
// fp16 1024.0 is 0x6400 and its ulp is 1, so OR-ing a 4-bit value q into the low mantissa bits gives exactly
// 1024 + q; OR-ing it into bits 4..7 gives 1024 + 16q. One lop3 ((a & mask) | magic) per pair of halves,
// then one sub / fma removes the bias and the zero point, leaving (q - zero) exactly in fp16.

__device__ __forceinline__ unsigned int and_or(unsigned int a, unsigned int mask, unsigned int magic) {
  unsigned int r;
  // immLut 0xEA = (A & B) | C for the lop3 truth-table inputs A = 0xF0, B = 0xCC, C = 0xAA
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(a), "r"(mask), "r"(magic));
  return r;
}

__device__ __forceinline__ __half2 as_half2(unsigned int bits) {
  __half2 h;
  *reinterpret_cast<unsigned int*>(&h) = bits;
  return h;
}

// The 8 codes of one 32-bit word (bytes b0..b3 = codes k0..k7, low nibble first) minus the zero point, as
// floats in k order.
__device__ __forceinline__ void decode_word(unsigned int word, int zero, float (&out)[8]) {
  const __half2 low_bias = __half2half2(__ushort_as_half(static_cast<unsigned short>(0x6400 + zero)));
  const __half2 sixteenth = __float2half2_rn(1.0f / 16.0f);
  const __half2 high_bias = __float2half2_rn(-(64.0f + zero));
#pragma unroll
  for (int shift = 0; shift < 2; ++shift) {  // shift 0: codes k0,k1,k4,k5; shift 1 (word >> 8): k2,k3,k6,k7
    const unsigned int w = word >> (8 * shift);
    const float2 even = __half22float2(__hsub2(as_half2(and_or(w, 0x000F000Fu, 0x64006400u)), low_bias));
    const float2 odd = __half22float2(__hfma2(as_half2(and_or(w, 0x00F000F0u, 0x64006400u)), sixteenth, high_bias));
    out[2 * shift] = even.x;      // low half: byte 0 or 1, low nibble
    out[2 * shift + 1] = odd.x;   // low half: high nibble
    out[2 * shift + 4] = even.y;  // high half: byte 2 or 3
    out[2 * shift + 5] = odd.y;
  }
}

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&out)[8]) {
  const uint4 v = *reinterpret_cast<const uint4*>(p);  // x is small and reused by every warp: keep it cached
  const T* e = reinterpret_cast<const T*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(e[i]);
}

constexpr int kDecodeWarps = 8;  // output channels per block
constexpr int kChunk = 32;       // codes per thread per step: 16 bytes

// One warp per output channel n; lane l takes chunks l, l + 32, ... of this block's K slice. kM >= M rows of
// x are processed together, so each weight chunk is decoded once and used kM times.
template <typename T, typename S, int kM>
__global__ void int4_matmul_decode_kernel(
    const T* __restrict__ x,              // (M, K) row-major, 16-byte aligned, K % 32 == 0
    const unsigned char* __restrict__ qweight,  // (N, K / 2) packed codes, 16-byte aligned rows
    const S* __restrict__ scales,         // (N, K / G)
    const unsigned char* __restrict__ zeros,    // (N, K / G)
    T* __restrict__ out,                  // (M, N), written when gridDim.y == 1
    float* __restrict__ partial,          // (gridDim.y, M, N) fp32 partial sums when gridDim.y > 1
    int M, int N, int K, int group_size, int k_per_split) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = blockIdx.x * kDecodeWarps + warp;
  if (n >= N) return;
  const int groups = K / group_size;
  const int k_begin = blockIdx.y * k_per_split;
  const int k_end = min(k_begin + k_per_split, K);
  const uint4* row = reinterpret_cast<const uint4*>(qweight + static_cast<long long>(n) * (K / 2));

  float acc[kM];
#pragma unroll
  for (int m = 0; m < kM; ++m) acc[m] = 0.0f;

  for (int k0 = k_begin + lane * kChunk; k0 < k_end; k0 += 32 * kChunk) {
    const uint4 packed = __ldcs(row + k0 / kChunk);  // weights are read once: streaming, evict-first
    const int g = k0 / group_size;                    // 32 | group_size: the chunk lies in one group
    const float scale = to_float(scales[static_cast<long long>(n) * groups + g]);
    const int zero = zeros[static_cast<long long>(n) * groups + g];
    float w[kChunk];
    const unsigned int words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) decode_word(words[j], zero, *reinterpret_cast<float(*)[8]>(&w[8 * j]));
#pragma unroll
    for (int m = 0; m < kM; ++m) {
      if (m < M) {
        const T* xr = x + static_cast<long long>(m) * K + k0;
        float sum = 0.0f;
#pragma unroll
        for (int j = 0; j < kChunk / 8; ++j) {
          float xv[8];
          load8(xr + 8 * j, xv);
#pragma unroll
          for (int i = 0; i < 8; ++i) sum = fmaf(xv[i], w[8 * j + i], sum);
        }
        acc[m] = fmaf(sum, scale, acc[m]);  // the group's scale once per 32 products
      }
    }
  }

#pragma unroll
  for (int m = 0; m < kM; ++m) {
    if (m >= M) break;
    const float v = warp_sum(acc[m]);
    if (lane == 0) {
      if (gridDim.y == 1)
        out[static_cast<long long>(m) * N + n] = from_float<T>(v);
      else
        partial[(static_cast<long long>(blockIdx.y) * M + m) * N + n] = v;
    }
  }
}

// out[i] = sum over the split slices of partial[s][i], i over M * N.
template <typename T>
__global__ void int4_matmul_split_reduce_kernel(const float* __restrict__ partial, T* __restrict__ out,
                                                long long count, int splits) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  float sum = 0.0f;
  for (int s = 0; s < splits; ++s) sum += partial[s * count + i];
  out[i] = from_float<T>(sum);
}

constexpr int kTileM = 64, kTileN = 64, kTileK = 32, kThreads = 256;  // 16 x 16 threads, 4 x 4 outputs each

// The readable general path: per K step, x (kTileM x kTileK) and the dequantized weights (kTileN x kTileK)
// go to shared memory as fp32; each thread accumulates a 4 x 4 block of outputs.
template <typename T, typename S>
__global__ void int4_matmul_tiled_kernel(
    const T* __restrict__ x,                    // (M, K) row-major
    const unsigned char* __restrict__ qweight,  // (N, K / 2)
    const S* __restrict__ scales,               // (N, K / G)
    const unsigned char* __restrict__ zeros,    // (N, K / G)
    T* __restrict__ out,                        // (M, N) row-major
    long long M, long long N, long long K, long long group_size) {
  __shared__ float xs[kTileK][kTileM + 1];  // +1: no bank conflicts on the transposed stores
  __shared__ float ws[kTileK][kTileN + 1];
  const long long m0 = static_cast<long long>(blockIdx.y) * kTileM;
  const long long n0 = static_cast<long long>(blockIdx.x) * kTileN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const long long groups = K / group_size;
  float acc[4][4] = {};
  for (long long k0 = 0; k0 < K; k0 += kTileK) {
    for (int i = threadIdx.x; i < kTileM * kTileK; i += kThreads) {
      const int r = i / kTileK, kk = i % kTileK;
      const long long m = m0 + r, k = k0 + kk;
      xs[kk][r] = (m < M && k < K) ? to_float(x[m * K + k]) : 0.0f;
      const long long n = n0 + r;
      float w = 0.0f;
      if (n < N && k < K) {
        const unsigned char byte = qweight[n * (K / 2) + k / 2];
        const int code = (k & 1) ? (byte >> 4) : (byte & 0xF);
        const long long g = n * groups + k / group_size;
        w = static_cast<float>(code - zeros[g]) * to_float(scales[g]);
      }
      ws[kk][r] = w;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      float a[4], b[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        a[i] = xs[kk][ty * 4 + i];
        b[i] = ws[kk][tx * 4 + i];
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const long long m = m0 + ty * 4 + i, n = n0 + tx * 4 + j;
      if (m < M && n < N) out[m * N + n] = from_float<T>(acc[i][j]);
    }
}

}  // namespace gpuforge

#ifndef __CUDACC_RTC__
#include "launchers.h"

namespace gpuforge {

namespace {

template <typename T, typename S, int kM>
cudaError_t launch_decode(const T* x, const unsigned char* qweight, const S* scales, const unsigned char* zeros,
                          T* out, float* workspace, int64_t M, int64_t N, int64_t K, int64_t group_size,
                          int64_t split_k, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((N + kDecodeWarps - 1) / kDecodeWarps), static_cast<unsigned>(split_k));
  int4_matmul_decode_kernel<T, S, kM><<<grid, kDecodeWarps * 32, 0, stream>>>(
      x, qweight, scales, zeros, out, workspace, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
      static_cast<int>(group_size), static_cast<int>(K / split_k));
  GF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  if (split_k > 1) {
    const long long count = M * N;
    int4_matmul_split_reduce_kernel<T><<<static_cast<unsigned>((count + 255) / 256), 256, 0, stream>>>(
        workspace, out, count, static_cast<int>(split_k));
    GF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

template <typename T, typename S>
cudaError_t launch_typed(const void* x, const unsigned char* qweight, const void* scales,
                         const unsigned char* zeros, void* out, float* workspace, int64_t M, int64_t N, int64_t K,
                         int64_t group_size, int64_t split_k, cudaStream_t stream) {
  auto* px = static_cast<const T*>(x);
  auto* ps = static_cast<const S*>(scales);
  auto* po = static_cast<T*>(out);
  if (split_k == 0) {
    const dim3 grid(static_cast<unsigned>((N + kTileN - 1) / kTileN), static_cast<unsigned>((M + kTileM - 1) / kTileM));
    int4_matmul_tiled_kernel<T, S><<<grid, kThreads, 0, stream>>>(px, qweight, ps, zeros, po, M, N, K, group_size);
    return cudaGetLastError();
  }
  // The rows of x processed together: the smallest instantiated count >= M (registers grow with it).
  if (M <= 1) return launch_decode<T, S, 1>(px, qweight, ps, zeros, po, workspace, M, N, K, group_size, split_k, stream);
  if (M <= 2) return launch_decode<T, S, 2>(px, qweight, ps, zeros, po, workspace, M, N, K, group_size, split_k, stream);
  if (M <= 4) return launch_decode<T, S, 4>(px, qweight, ps, zeros, po, workspace, M, N, K, group_size, split_k, stream);
  if (M <= 8) return launch_decode<T, S, 8>(px, qweight, ps, zeros, po, workspace, M, N, K, group_size, split_k, stream);
  return launch_decode<T, S, 16>(px, qweight, ps, zeros, po, workspace, M, N, K, group_size, split_k, stream);
}

template <typename T>
cudaError_t launch_for_scales(DType scale_dtype, const void* x, const unsigned char* qweight, const void* scales,
                              const unsigned char* zeros, void* out, float* workspace, int64_t M, int64_t N,
                              int64_t K, int64_t group_size, int64_t split_k, cudaStream_t stream) {
  switch (scale_dtype) {
    case DType::Float32:
      return launch_typed<T, float>(x, qweight, scales, zeros, out, workspace, M, N, K, group_size, split_k, stream);
    case DType::Float16:
      return launch_typed<T, __half>(x, qweight, scales, zeros, out, workspace, M, N, K, group_size, split_k, stream);
    case DType::BFloat16:
      return launch_typed<T, __nv_bfloat16>(x, qweight, scales, zeros, out, workspace, M, N, K, group_size, split_k,
                                            stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_int4_matmul(const void* x, const unsigned char* qweight, const void* scales,
                               const unsigned char* zeros, void* out, float* workspace, int64_t M, int64_t N,
                               int64_t K, int64_t group_size, int64_t split_k, DType x_dtype, DType scale_dtype,
                               cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  if (x_dtype == DType::Float16)
    return launch_for_scales<__half>(scale_dtype, x, qweight, scales, zeros, out, workspace, M, N, K, group_size,
                                     split_k, stream);
  if (x_dtype == DType::BFloat16)
    return launch_for_scales<__nv_bfloat16>(scale_dtype, x, qweight, scales, zeros, out, workspace, M, N, K,
                                            group_size, split_k, stream);
  return cudaErrorInvalidValue;  // fp32 activations: the bindings reject them before this
}

}  // namespace gpuforge
#endif
