// RMSNorm over the last dim, forward and backward, float32 / float16 / bfloat16 with fp32 statistics.
//
//   forward:  h = x + residual (optional), rstd = 1 / sqrt(mean(h²) + eps), y = h · rstd · w
//   backward: x̂ = x · rstd, g = dy · w, dx = rstd · (g − x̂ · mean(g · x̂)) (+ dh), dw = Σ_rows dy · x̂
//
// One block per row in the forward. The backward gives each block a contiguous band of rows; the block keeps
// its share of dw in shared memory (fp32, one slot per column, each slot owned by one thread so no atomics
// are needed inside the block) and writes it out once as a partial row. A second kernel sums the partial
// rows column by column in a fixed order, so the weight gradient is bit-identical from run to run; the
// atomic variant adds the partial rows into one fp32 row instead (order, and so the last bits, may vary).
//
// RMSNorm is memory-bound (about 2 bytes of traffic per flop in bf16), so the kernels are written for
// bandwidth: 16-byte vector loads/stores when every row start is 16-byte aligned, and the second read of a
// row comes right after the first, from L1/L2 rather than HBM.
#include "common.cuh"

namespace gpuforge {

// VEC elements moved as one aligned load/store (16 bytes when VEC = 16 / sizeof(T)).
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Packed {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ Packed<T, VEC> load_packed(const T* p) {
  return *reinterpret_cast<const Packed<T, VEC>*>(p);
}

template <typename T, int VEC>
__device__ __forceinline__ void store_packed(T* p, const Packed<T, VEC>& value) {
  *reinterpret_cast<Packed<T, VEC>*>(p) = value;
}

// Sum of one value per thread over the block: shuffles within each warp, then warp 0 adds the per-warp sums.
// The order is fixed, so the result is deterministic. `scratch` holds 33 floats; every thread gets the sum.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) >> 5;
    float total = warp_sum(lane < warps ? scratch[lane] : 0.f);
    if (lane == 0) scratch[32] = total;
  }
  __syncthreads();
  const float total = scratch[32];
  __syncthreads();  // scratch may be reused by the next call
  return total;
}

// One block per row. Thread t handles the VEC-wide chunks t, t + blockDim, … of the row, in both passes, so
// the h it writes in the first pass is the h it reads back in the second without a barrier.
template <typename T, int VEC, bool HAS_RESIDUAL>
__global__ void rms_norm_forward_kernel(const T* __restrict__ x,         // (rows, n), last dim contiguous
                                        long long x_row_stride,
                                        const T* __restrict__ residual,  // (rows, n); read if HAS_RESIDUAL
                                        long long residual_row_stride,
                                        const T* __restrict__ weight,    // (n,)
                                        T* __restrict__ y,               // (rows, n), contiguous
                                        T* __restrict__ h,               // (rows, n) x + residual, if HAS_RESIDUAL
                                        float* __restrict__ rstd,        // (rows,) 1/rms, for the backward
                                        long long n, float eps) {
  __shared__ float scratch[33];
  const long long row = blockIdx.x;
  const T* x_row = x + row * x_row_stride;
  T* y_row = y + row * n;
  T* h_row = HAS_RESIDUAL ? h + row * n : nullptr;
  const long long step = (long long)blockDim.x * VEC;

  float sum_sq = 0.f;
  for (long long i = (long long)threadIdx.x * VEC; i < n; i += step) {
    Packed<T, VEC> v = load_packed<T, VEC>(x_row + i);
    if constexpr (HAS_RESIDUAL) {
      const Packed<T, VEC> r = load_packed<T, VEC>(residual + row * residual_row_stride + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) v.v[k] = from_float<T>(to_float(v.v[k]) + to_float(r.v[k]));
      store_packed<T, VEC>(h_row + i, v);  // rounded to T: the norm sees the h the caller gets back
    }
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float f = to_float(v.v[k]);
      sum_sq += f * f;
    }
  }
  const float r = rsqrtf(block_sum(sum_sq, scratch) / (float)n + eps);
  if (threadIdx.x == 0) rstd[row] = r;

  const T* src = HAS_RESIDUAL ? h_row : x_row;
  for (long long i = (long long)threadIdx.x * VEC; i < n; i += step) {
    const Packed<T, VEC> v = load_packed<T, VEC>(src + i);
    const Packed<T, VEC> w = load_packed<T, VEC>(weight + i);
    Packed<T, VEC> out;
#pragma unroll
    for (int k = 0; k < VEC; ++k) out.v[k] = from_float<T>(to_float(v.v[k]) * r * to_float(w.v[k]));
    store_packed<T, VEC>(y_row + i, out);
  }
}

// A band of rows per block. Dynamic shared memory holds the block's fp32 partial dw (n floats), stored
// element-major (slot k of chunk c at k · chunks + c) so that the 32 threads of a warp, which own 32 consecutive
// chunks, touch 32 consecutive words: no bank conflicts, where the natural layout would be VEC-way conflicted.
template <typename T, int VEC, bool HAS_DH, bool ATOMIC>
__global__ void rms_norm_backward_kernel(const T* __restrict__ dy,        // (rows, n) upstream gradient
                                         long long dy_row_stride,
                                         const T* __restrict__ x,         // (rows, n) normalised input (or h)
                                         long long x_row_stride,
                                         const T* __restrict__ weight,    // (n,)
                                         const float* __restrict__ rstd,  // (rows,) from the forward
                                         const T* __restrict__ dh,        // (rows, n) added to dx, if HAS_DH
                                         long long dh_row_stride,
                                         T* __restrict__ dx,              // (rows, n), contiguous
                                         float* __restrict__ dw_partial,  // (gridDim.x, n), or (1, n) zeroed if ATOMIC
                                         long long rows, long long n) {
  GF_DYNAMIC_SHARED(float, dw_acc);
  __shared__ float scratch[33];
  const long long step = (long long)blockDim.x * VEC;
  const long long chunks = n / VEC;  // n is a multiple of VEC
  for (long long i = (long long)threadIdx.x * VEC; i < n; i += step) {
#pragma unroll
    for (int k = 0; k < VEC; ++k) dw_acc[k * chunks + i / VEC] = 0.f;
  }
  const long long band = (rows + gridDim.x - 1) / gridDim.x;
  const long long first = (long long)blockIdx.x * band;
  const long long last = first + band < rows ? first + band : rows;
  for (long long row = first; row < last; ++row) {
    const T* dy_row = dy + row * dy_row_stride;
    const T* x_row = x + row * x_row_stride;
    const float r = rstd[row];
    float dot = 0.f;  // Σ g · x̂ over the row
    for (long long i = (long long)threadIdx.x * VEC; i < n; i += step) {
      const Packed<T, VEC> vdy = load_packed<T, VEC>(dy_row + i);
      const Packed<T, VEC> vx = load_packed<T, VEC>(x_row + i);
      const Packed<T, VEC> vw = load_packed<T, VEC>(weight + i);
#pragma unroll
      for (int k = 0; k < VEC; ++k) dot += to_float(vdy.v[k]) * to_float(vw.v[k]) * to_float(vx.v[k]) * r;
    }
    const float mean_dot = block_sum(dot, scratch) / (float)n;
    for (long long i = (long long)threadIdx.x * VEC; i < n; i += step) {
      const Packed<T, VEC> vdy = load_packed<T, VEC>(dy_row + i);
      const Packed<T, VEC> vx = load_packed<T, VEC>(x_row + i);
      const Packed<T, VEC> vw = load_packed<T, VEC>(weight + i);
      Packed<T, VEC> extra;
      if constexpr (HAS_DH) extra = load_packed<T, VEC>(dh + row * dh_row_stride + i);
      Packed<T, VEC> out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const float g = to_float(vdy.v[k]);
        const float xhat = to_float(vx.v[k]) * r;
        float d = r * (g * to_float(vw.v[k]) - xhat * mean_dot);
        if constexpr (HAS_DH) d += to_float(extra.v[k]);
        out.v[k] = from_float<T>(d);
        dw_acc[k * chunks + i / VEC] += g * xhat;
      }
      store_packed<T, VEC>(dx + row * n + i, out);
    }
  }
  __syncthreads();  // the write-out below reads other threads' slots, one column per thread (coalesced)
  for (long long col = threadIdx.x; col < n; col += blockDim.x) {
    const float value = dw_acc[(col % VEC) * chunks + col / VEC];
    if constexpr (ATOMIC)
      atomicAdd(dw_partial + col, value);
    else
      dw_partial[(long long)blockIdx.x * n + col] = value;
  }
}

// Second pass: one thread per column sums the partial rows top to bottom (coalesced across the warp).
template <typename T>
__global__ void rms_norm_sum_partials_kernel(const float* __restrict__ partial,  // (num_partials, n)
                                             T* __restrict__ dw,                 // (n,)
                                             long long num_partials, long long n) {
  const long long col = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (col >= n) return;
  float total = 0.f;
  for (long long p = 0; p < num_partials; ++p) total += partial[p * n + col];
  dw[col] = from_float<T>(total);
}

}  // namespace gpuforge

#ifndef __CUDACC_RTC__
#include <algorithm>
#include <initializer_list>

#include "launchers.h"

namespace gpuforge {

constexpr int kRmsNormMaxThreads = 512;
constexpr int kSumPartialsThreads = 256;
constexpr int kBackwardBlocksPerSm = 2;  // two resident bands per SM hide the block_sum barriers

// One thread per VEC-wide chunk of the row, in whole warps, at most 512: short rows get one warp, 4096-wide
// bf16 rows one 16-byte chunk per thread.
static int rms_norm_threads(int64_t n, int vec) {
  const int64_t chunks = (n + vec - 1) / vec;
  const int64_t threads = std::max<int64_t>(32, (chunks + 31) / 32 * 32);
  return (int)std::min<int64_t>(threads, kRmsNormMaxThreads);
}

// The vector width every pointer and row stride allows: 16 bytes, or one element.
template <typename T>
static int vec_width(int64_t n, std::initializer_list<const void*> ptrs, std::initializer_list<int64_t> strides) {
  constexpr int kVec = 16 / sizeof(T);
  if (n % kVec) return 1;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return 1;
  for (int64_t s : strides)
    if (s % kVec) return 1;
  return kVec;
}

cudaError_t launch_rms_norm_forward(const void* x, int64_t x_row_stride, const void* residual,
                                    int64_t residual_row_stride, const void* weight, void* y, void* h, float* rstd,
                                    int64_t rows, int64_t n, float eps, DType dtype, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return GF_DISPATCH_FLOAT_TYPES(dtype, [&] {
    auto* px = static_cast<const scalar_t*>(x);
    auto* pr = static_cast<const scalar_t*>(residual);
    auto* pw = static_cast<const scalar_t*>(weight);
    auto* py = static_cast<scalar_t*>(y);
    auto* ph = static_cast<scalar_t*>(h);
    const int vec = vec_width<scalar_t>(n, {x, residual, weight, y, h},
                                        {x_row_stride, residual ? residual_row_stride : 0});
    const int threads = rms_norm_threads(n, vec);
    const dim3 grid((unsigned)rows);
    constexpr int kVec = 16 / sizeof(scalar_t);
    if (residual) {
      if (vec == kVec)
        rms_norm_forward_kernel<scalar_t, kVec, true><<<grid, threads, 0, stream>>>(
            px, x_row_stride, pr, residual_row_stride, pw, py, ph, rstd, n, eps);
      else
        rms_norm_forward_kernel<scalar_t, 1, true><<<grid, threads, 0, stream>>>(
            px, x_row_stride, pr, residual_row_stride, pw, py, ph, rstd, n, eps);
    } else {
      if (vec == kVec)
        rms_norm_forward_kernel<scalar_t, kVec, false><<<grid, threads, 0, stream>>>(
            px, x_row_stride, px, 0, pw, py, nullptr, rstd, n, eps);
      else
        rms_norm_forward_kernel<scalar_t, 1, false><<<grid, threads, 0, stream>>>(
            px, x_row_stride, px, 0, pw, py, nullptr, rstd, n, eps);
    }
    return cudaGetLastError();
  });
}

cudaError_t rms_norm_backward_blocks(int64_t rows, int device, int* blocks) {
  int sms = 0;
  GF_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t wanted = (int64_t)sms * kBackwardBlocksPerSm;
  *blocks = (int)(rows < wanted ? (rows > 0 ? rows : 1) : wanted);
  return cudaSuccess;
}

template <typename T, int VEC, bool HAS_DH, bool ATOMIC>
static cudaError_t launch_backward_kernel(const T* dy, int64_t dy_rs, const T* x, int64_t x_rs, const T* w,
                                          const float* rstd, const T* dh, int64_t dh_rs, T* dx, float* partial,
                                          int blocks, int64_t rows, int64_t n, cudaStream_t stream) {
  const size_t smem = (size_t)n * sizeof(float);
  auto kernel = rms_norm_backward_kernel<T, VEC, HAS_DH, ATOMIC>;
  // Beyond the default 48 KB of dynamic shared memory a kernel has to opt in (up to 163 KB on A100, 227 KB H100).
  if (smem > 48 * 1024)
    GF_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  kernel<<<blocks, rms_norm_threads(n, VEC), smem, stream>>>(dy, dy_rs, x, x_rs, w, rstd, dh, dh_rs, dx, partial,
                                                             rows, n);
  return cudaGetLastError();
}

template <typename T, int VEC>
static cudaError_t launch_backward_switch(bool has_dh, bool atomic, const T* dy, int64_t dy_rs, const T* x,
                                          int64_t x_rs, const T* w, const float* rstd, const T* dh, int64_t dh_rs,
                                          T* dx, float* partial, int blocks, int64_t rows, int64_t n,
                                          cudaStream_t stream) {
  if (has_dh && atomic)
    return launch_backward_kernel<T, VEC, true, true>(dy, dy_rs, x, x_rs, w, rstd, dh, dh_rs, dx, partial, blocks,
                                                      rows, n, stream);
  if (has_dh)
    return launch_backward_kernel<T, VEC, true, false>(dy, dy_rs, x, x_rs, w, rstd, dh, dh_rs, dx, partial,
                                                       blocks, rows, n, stream);
  if (atomic)
    return launch_backward_kernel<T, VEC, false, true>(dy, dy_rs, x, x_rs, w, rstd, dh, dh_rs, dx, partial,
                                                       blocks, rows, n, stream);
  return launch_backward_kernel<T, VEC, false, false>(dy, dy_rs, x, x_rs, w, rstd, dh, dh_rs, dx, partial, blocks,
                                                      rows, n, stream);
}

cudaError_t launch_rms_norm_backward(const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                                     const void* weight, const float* rstd, const void* dh, int64_t dh_row_stride,
                                     void* dx, void* dw, float* partial, int blocks, int64_t rows, int64_t n,
                                     bool deterministic, DType dtype, cudaStream_t stream) {
  return GF_DISPATCH_FLOAT_TYPES(dtype, [&] {
    auto* pdy = static_cast<const scalar_t*>(dy);
    auto* px = static_cast<const scalar_t*>(x);
    auto* pw = static_cast<const scalar_t*>(weight);
    auto* pdh = static_cast<const scalar_t*>(dh);
    auto* pdx = static_cast<scalar_t*>(dx);
    if (rows > 0) {
      const int vec = vec_width<scalar_t>(n, {dy, x, weight, dh, dx},
                                          {dy_row_stride, x_row_stride, dh ? dh_row_stride : 0});
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool atomic = !deterministic;
      const cudaError_t err =
          vec == kVec ? launch_backward_switch<scalar_t, kVec>(dh != nullptr, atomic, pdy, dy_row_stride, px,
                                                               x_row_stride, pw, rstd, pdh, dh_row_stride, pdx,
                                                               partial, blocks, rows, n, stream)
                      : launch_backward_switch<scalar_t, 1>(dh != nullptr, atomic, pdy, dy_row_stride, px,
                                                            x_row_stride, pw, rstd, pdh, dh_row_stride, pdx,
                                                            partial, blocks, rows, n, stream);
      GF_CUDA_RETURN_IF_ERROR(err);
    }
    // With no rows the caller's zeroed partial row makes dw zero.
    const int64_t num_partials = deterministic && rows > 0 ? blocks : 1;
    const unsigned grid = (unsigned)((n + kSumPartialsThreads - 1) / kSumPartialsThreads);
    rms_norm_sum_partials_kernel<scalar_t><<<grid, kSumPartialsThreads, 0, stream>>>(
        partial, static_cast<scalar_t*>(dw), num_partials, n);
    return cudaGetLastError();
  });
}

}  // namespace gpuforge
#endif
