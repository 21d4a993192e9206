// Softmax over the last dim of a (rows, n) matrix, forward and fused backward, float32 / float16 / bfloat16,
// fp32 arithmetic, one rounding on store:
//
//   forward:  y  = exp(x − max) / Σ exp(x − max)
//   backward: dx = y ⊙ (dy − Σ dy⊙y)
//
// Softmax is memory-bound (a few flops per byte), so the kernels are written for bandwidth: each row is read
// from HBM once and written once whenever it fits in registers, with 16-byte vector loads/stores when the
// pointers and row strides allow. Three shapes, chosen by row length at launch (template constants, no
// branches in the inner loops):
//   * warp kernel: one row per warp, reductions by warp shuffles only (no shared memory, no barriers), for
//     rows up to 32·8 chunks (2048 halves / 1024 floats with vectors);
//   * block kernel, cached: one row per 512-thread block, the row in registers (kChunks chunks per thread),
//     reductions by warp shuffles then one shared-memory step across the 16 warps;
//   * block kernel, streaming (kChunks = 0): rows too long for registers. The forward keeps a running max and
//     running sum per thread (the online softmax: the sum is rescaled when the max grows), combines them once,
//     then re-reads the row to write it; the second read is mostly served by L2.
// A fully masked row (all −inf) gives NaN, as torch.softmax does.
#include "common.cuh"

#ifndef __CUDACC_RTC__
#include <type_traits>
#endif

namespace gpuforge {

constexpr int kWarpsPerBlock = 4;       // rows per block of the warp kernel
constexpr int kRowBlockThreads = 512;   // threads of the block kernel (16 warps)
constexpr int kMaxWarpChunks = 8;       // warp kernel: up to 8 chunks (of kVec elements) per lane
constexpr int kMaxBlockChunksFwd = 8;   // 8 chunks × 8 halves = 64 cached floats per thread
constexpr int kMaxBlockChunksBwd = 4;   // the backward caches dy and y: half the chunks, same registers

namespace softmax_detail {

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

template <typename T, int kVec>
struct alignas(sizeof(T) * kVec) Chunk {
  T v[kVec];
};

// kVec elements at p[i..i+kVec) as floats, or `fill` when the chunk lies past n. With kVec > 1 the launcher
// guarantees n % kVec == 0 and 16-byte alignment, so a chunk is wholly inside or wholly outside the row.
template <typename T, int kVec>
__device__ __forceinline__ void load_chunk(const T* __restrict__ p, long long i, long long n, float fill,
                                           float (&out)[kVec]) {
  if (i < n) {
    const Chunk<T, kVec> c = *reinterpret_cast<const Chunk<T, kVec>*>(p + i);
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = to_float(c.v[k]);
  } else {
#pragma unroll
    for (int k = 0; k < kVec; ++k) out[k] = fill;
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void store_chunk(T* __restrict__ p, long long i, long long n, const float (&in)[kVec]) {
  if (i < n) {
    Chunk<T, kVec> c;
#pragma unroll
    for (int k = 0; k < kVec; ++k) c.v[k] = from_float<T>(in[k]);
    *reinterpret_cast<Chunk<T, kVec>*>(p + i) = c;
  }
}

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  __device__ __forceinline__ static float identity() { return neg_inf(); }
};
struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
  __device__ __forceinline__ static float identity() { return 0.f; }
};

template <class Op>
__device__ __forceinline__ float warp_all_reduce(float v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Reductions over the 32 lanes of a warp: registers and shuffles only.
struct WarpReduce {
  __device__ __forceinline__ float max(float v) const { return warp_all_reduce(v, MaxOp()); }
  __device__ __forceinline__ float sum(float v) const { return warp_all_reduce(v, SumOp()); }
};

// Reductions over a block: shuffles inside each warp, the per-warp results through 33 floats of shared
// memory, reduced by warp 0, broadcast back. Every thread of the block must call it.
struct BlockReduce {
  float* scratch;

  template <class Op>
  __device__ __forceinline__ float all(float v, Op op) const {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = warp_all_reduce(v, op);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
      const int warps = (blockDim.x + 31) >> 5;
      const float total = warp_all_reduce(lane < warps ? scratch[lane] : Op::identity(), op);
      if (lane == 0) scratch[32] = total;
    }
    __syncthreads();
    const float total = scratch[32];
    __syncthreads();  // scratch is reused by the next reduction
    return total;
  }
  __device__ __forceinline__ float max(float v) const { return all(v, MaxOp()); }
  __device__ __forceinline__ float sum(float v) const { return all(v, SumOp()); }
};

// Forward of one row held in registers: thread `tid` of `threads` owns chunks tid, tid + threads, … (so each
// warp-wide load is contiguous), keeps exp(x − max) in place and scales it on the way out.
template <typename T, int kChunks, int kVec, class Reduce>
__device__ __forceinline__ void forward_row_cached(const T* __restrict__ x, T* __restrict__ y, long long n,
                                                   int tid, int threads, const Reduce& reduce) {
  float v[kChunks][kVec];
  float m = neg_inf();
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    load_chunk<T, kVec>(x, ((long long)c * threads + tid) * kVec, n, neg_inf(), v[c]);
#pragma unroll
    for (int k = 0; k < kVec; ++k) m = fmaxf(m, v[c][k]);
  }
  m = reduce.max(m);
  float s = 0.f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      v[c][k] = expf(v[c][k] - m);  // padding lanes hold −inf: exp gives 0
      s += v[c][k];
    }
  }
  const float inv = 1.f / reduce.sum(s);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[c][k] *= inv;
    store_chunk<T, kVec>(y, ((long long)c * threads + tid) * kVec, n, v[c]);
  }
}

// Forward of a row too long for registers: per-thread online (max, sum), one combine, a second read to write.
template <typename T, int kVec>
__device__ __forceinline__ void forward_row_streaming(const T* __restrict__ x, T* __restrict__ y, long long n,
                                                      int tid, int threads, const BlockReduce& reduce) {
  const long long step = (long long)threads * kVec;
  float m = neg_inf(), s = 0.f;
  for (long long i = (long long)tid * kVec; i < n; i += step) {
    float v[kVec];
    load_chunk<T, kVec>(x, i, n, neg_inf(), v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) {
      if (v[k] > m) {  // the max grows: rescale the sum to the new max
        s = s * expf(m - v[k]) + 1.f;
        m = v[k];
      } else if (v[k] != neg_inf()) {  // −inf adds 0 (and −inf − −inf would be NaN)
        s += expf(v[k] - m);
      }
    }
  }
  const float row_max = reduce.max(m);
  const float inv = 1.f / reduce.sum(m == neg_inf() ? 0.f : s * expf(m - row_max));
  for (long long i = (long long)tid * kVec; i < n; i += step) {
    float v[kVec];
    load_chunk<T, kVec>(x, i, n, neg_inf(), v);
#pragma unroll
    for (int k = 0; k < kVec; ++k) v[k] = expf(v[k] - row_max) * inv;
    store_chunk<T, kVec>(y, i, n, v);
  }
}

// Backward of one row held in registers (dy and y): the dot Σ dy⊙y, then dx = y ⊙ (dy − dot).
template <typename T, int kChunks, int kVec, class Reduce>
__device__ __forceinline__ void backward_row_cached(const T* __restrict__ dy, const T* __restrict__ y,
                                                    T* __restrict__ dx, long long n, int tid, int threads,
                                                    const Reduce& reduce) {
  float g[kChunks][kVec], p[kChunks][kVec];
  float dot = 0.f;
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const long long i = ((long long)c * threads + tid) * kVec;
    load_chunk<T, kVec>(dy, i, n, 0.f, g[c]);
    load_chunk<T, kVec>(y, i, n, 0.f, p[c]);
#pragma unroll
    for (int k = 0; k < kVec; ++k) dot += g[c][k] * p[c][k];
  }
  dot = reduce.sum(dot);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int k = 0; k < kVec; ++k) g[c][k] = p[c][k] * (g[c][k] - dot);
    store_chunk<T, kVec>(dx, ((long long)c * threads + tid) * kVec, n, g[c]);
  }
}

template <typename T, int kVec>
__device__ __forceinline__ void backward_row_streaming(const T* __restrict__ dy, const T* __restrict__ y,
                                                       T* __restrict__ dx, long long n, int tid, int threads,
                                                       const BlockReduce& reduce) {
  const long long step = (long long)threads * kVec;
  float dot = 0.f;
  for (long long i = (long long)tid * kVec; i < n; i += step) {
    float g[kVec], p[kVec];
    load_chunk<T, kVec>(dy, i, n, 0.f, g);
    load_chunk<T, kVec>(y, i, n, 0.f, p);
#pragma unroll
    for (int k = 0; k < kVec; ++k) dot += g[k] * p[k];
  }
  dot = reduce.sum(dot);
  for (long long i = (long long)tid * kVec; i < n; i += step) {
    float g[kVec], p[kVec];
    load_chunk<T, kVec>(dy, i, n, 0.f, g);
    load_chunk<T, kVec>(y, i, n, 0.f, p);
#pragma unroll
    for (int k = 0; k < kVec; ++k) g[k] = p[k] * (g[k] - dot);
    store_chunk<T, kVec>(dx, i, n, g);
  }
}

}  // namespace softmax_detail

// One row per warp, kWarpsPerBlock rows per block; a warp past the last row exits (no barriers follow).
template <typename T, int kChunks, int kVec>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
softmax_fwd_warp_kernel(const T* __restrict__ x,  // (rows, n), last dim contiguous
                        long long x_row_stride,
                        T* __restrict__ y,        // (rows, n), contiguous
                        long long rows, long long n) {
  const long long row = (long long)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  softmax_detail::forward_row_cached<T, kChunks, kVec>(x + row * x_row_stride, y + row * n, n, threadIdx.x & 31,
                                                       32, softmax_detail::WarpReduce());
}

// One row per block of kRowBlockThreads; kChunks = 0 streams the row (online max/sum) instead of caching it.
template <typename T, int kChunks, int kVec>
__global__ void __launch_bounds__(kRowBlockThreads)
softmax_fwd_block_kernel(const T* __restrict__ x,  // (rows, n), last dim contiguous
                         long long x_row_stride,
                         T* __restrict__ y,        // (rows, n), contiguous
                         long long rows, long long n) {
  __shared__ float scratch[33];
  const long long row = blockIdx.x;
  const softmax_detail::BlockReduce reduce{scratch};
  if constexpr (kChunks == 0)
    softmax_detail::forward_row_streaming<T, kVec>(x + row * x_row_stride, y + row * n, n, threadIdx.x,
                                                   blockDim.x, reduce);
  else
    softmax_detail::forward_row_cached<T, kChunks, kVec>(x + row * x_row_stride, y + row * n, n, threadIdx.x,
                                                         blockDim.x, reduce);
}

template <typename T, int kChunks, int kVec>
__global__ void __launch_bounds__(32 * kWarpsPerBlock)
softmax_bwd_warp_kernel(const T* __restrict__ dy,  // (rows, n), last dim contiguous
                        long long dy_row_stride,
                        const T* __restrict__ y,   // (rows, n), contiguous: the forward's output
                        T* __restrict__ dx,        // (rows, n), contiguous
                        long long rows, long long n) {
  const long long row = (long long)blockIdx.x * kWarpsPerBlock + (threadIdx.x >> 5);
  if (row >= rows) return;
  softmax_detail::backward_row_cached<T, kChunks, kVec>(dy + row * dy_row_stride, y + row * n, dx + row * n, n,
                                                        threadIdx.x & 31, 32, softmax_detail::WarpReduce());
}

template <typename T, int kChunks, int kVec>
__global__ void __launch_bounds__(kRowBlockThreads)
softmax_bwd_block_kernel(const T* __restrict__ dy,  // (rows, n), last dim contiguous
                         long long dy_row_stride,
                         const T* __restrict__ y,   // (rows, n), contiguous: the forward's output
                         T* __restrict__ dx,        // (rows, n), contiguous
                         long long rows, long long n) {
  __shared__ float scratch[33];
  const long long row = blockIdx.x;
  const softmax_detail::BlockReduce reduce{scratch};
  if constexpr (kChunks == 0)
    softmax_detail::backward_row_streaming<T, kVec>(dy + row * dy_row_stride, y + row * n, dx + row * n, n,
                                                    threadIdx.x, blockDim.x, reduce);
  else
    softmax_detail::backward_row_cached<T, kChunks, kVec>(dy + row * dy_row_stride, y + row * n, dx + row * n, n,
                                                          threadIdx.x, blockDim.x, reduce);
}

}  // namespace gpuforge

#ifndef __CUDACC_RTC__
#include "launchers.h"

namespace gpuforge {
namespace {

template <int C>
using Chunks = std::integral_constant<int, C>;

// Calls launch(Chunks<C>) with the fewest chunks C in {1, 2, 4, 8} (C <= kMax) such that n <= C · per_chunk,
// or, when no C fits, with C = 0 (streaming) if kCanStream.
template <int kMax, bool kCanStream, class Launch>
cudaError_t with_chunks(long long n, long long per_chunk, Launch&& launch) {
  if (n <= per_chunk) return launch(Chunks<1>());
  if constexpr (kMax >= 2) {
    if (n <= 2 * per_chunk) return launch(Chunks<2>());
  }
  if constexpr (kMax >= 4) {
    if (n <= 4 * per_chunk) return launch(Chunks<4>());
  }
  if constexpr (kMax >= 8) {
    if (n <= 8 * per_chunk) return launch(Chunks<8>());
  }
  if constexpr (kCanStream) return launch(Chunks<0>());
  return cudaErrorInvalidValue;  // the caller checked n <= kMax · per_chunk
}

template <typename T, int kVec>
cudaError_t forward_typed(const T* x, long long x_row_stride, T* y, long long rows, long long n,
                          cudaStream_t stream) {
  if (n <= 32LL * kMaxWarpChunks * kVec) {
    const unsigned blocks = (unsigned)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    return with_chunks<kMaxWarpChunks, false>(n, 32LL * kVec, [&](auto chunks) {
      softmax_fwd_warp_kernel<T, decltype(chunks)::value, kVec><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
          x, x_row_stride, y, rows, n);
      return cudaGetLastError();
    });
  }
  return with_chunks<kMaxBlockChunksFwd, true>(n, (long long)kRowBlockThreads * kVec, [&](auto chunks) {
    softmax_fwd_block_kernel<T, decltype(chunks)::value, kVec><<<(unsigned)rows, kRowBlockThreads, 0, stream>>>(
        x, x_row_stride, y, rows, n);
    return cudaGetLastError();
  });
}

template <typename T, int kVec>
cudaError_t backward_typed(const T* dy, long long dy_row_stride, const T* y, T* dx, long long rows, long long n,
                           cudaStream_t stream) {
  if (n <= 32LL * kMaxWarpChunks * kVec) {
    const unsigned blocks = (unsigned)((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
    return with_chunks<kMaxWarpChunks, false>(n, 32LL * kVec, [&](auto chunks) {
      softmax_bwd_warp_kernel<T, decltype(chunks)::value, kVec><<<blocks, 32 * kWarpsPerBlock, 0, stream>>>(
          dy, dy_row_stride, y, dx, rows, n);
      return cudaGetLastError();
    });
  }
  return with_chunks<kMaxBlockChunksBwd, true>(n, (long long)kRowBlockThreads * kVec, [&](auto chunks) {
    softmax_bwd_block_kernel<T, decltype(chunks)::value, kVec><<<(unsigned)rows, kRowBlockThreads, 0, stream>>>(
        dy, dy_row_stride, y, dx, rows, n);
    return cudaGetLastError();
  });
}

// Rows go on grid.x: one per block (block kernels) or kWarpsPerBlock per block (warp kernels).
constexpr long long kMaxRows = (1LL << 31) - 1;

}  // namespace

cudaError_t launch_softmax_forward(const void* x, int64_t x_row_stride, void* y, int64_t rows, int64_t n,
                                   DType dtype, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (rows > kMaxRows) return cudaErrorInvalidConfiguration;
  return GF_DISPATCH_FLOAT_TYPES(dtype, [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto* px = static_cast<const scalar_t*>(x);
    auto* py = static_cast<scalar_t*>(y);
    // 16-byte chunks need every row start aligned: aligned bases, row strides and n multiples of kVec.
    if (aligned16(x) && aligned16(y) && x_row_stride % kVec == 0 && n % kVec == 0)
      return forward_typed<scalar_t, kVec>(px, x_row_stride, py, rows, n, stream);
    return forward_typed<scalar_t, 1>(px, x_row_stride, py, rows, n, stream);
  });
}

cudaError_t launch_softmax_backward(const void* dy, int64_t dy_row_stride, const void* y, void* dx, int64_t rows,
                                    int64_t n, DType dtype, cudaStream_t stream) {
  if (rows == 0 || n == 0) return cudaSuccess;
  if (rows > kMaxRows) return cudaErrorInvalidConfiguration;
  return GF_DISPATCH_FLOAT_TYPES(dtype, [&] {
    constexpr int kVec = 16 / sizeof(scalar_t);
    auto* pdy = static_cast<const scalar_t*>(dy);
    auto* py = static_cast<const scalar_t*>(y);
    auto* pdx = static_cast<scalar_t*>(dx);
    if (aligned16(dy) && aligned16(y) && aligned16(dx) && dy_row_stride % kVec == 0 && n % kVec == 0)
      return backward_typed<scalar_t, kVec>(pdy, dy_row_stride, py, pdx, rows, n, stream);
    return backward_typed<scalar_t, 1>(pdy, dy_row_stride, py, pdx, rows, n, stream);
  });
}

}  // namespace gpuforge
#endif
