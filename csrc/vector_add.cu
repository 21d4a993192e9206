// out = a + b elementwise, for float32 / float16 / bfloat16, with 64-bit indexing.
//
// The fast kernel moves 16 bytes per thread per access (one uint4: 4 floats or 8 halves), which is what it
// takes to saturate HBM: narrower loads leave the memory system with too few bytes in flight per warp.
// It needs 16-byte-aligned pointers; the launcher falls back to the scalar kernel otherwise.
#include "common.cuh"

#ifndef __CUDACC_RTC__
#include <algorithm>
#endif

namespace gpuforge {

// One thread adds one 16-byte chunk per grid-stride step; the few elements past the last full chunk are
// added by the first threads of the grid.
template <typename T>
__global__ void vector_add_vec16_kernel(const T* __restrict__ a,   // input, 16-byte aligned
                                        const T* __restrict__ b,   // input, 16-byte aligned
                                        T* __restrict__ out,       // output, 16-byte aligned
                                        long long n) {             // number of elements
  constexpr int kPerChunk = 16 / sizeof(T);
  const long long num_chunks = n / kPerChunk;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  const uint4* a4 = reinterpret_cast<const uint4*>(a);
  const uint4* b4 = reinterpret_cast<const uint4*>(b);
  uint4* out4 = reinterpret_cast<uint4*>(out);
  for (long long chunk = first; chunk < num_chunks; chunk += stride) {
    uint4 va = a4[chunk];
    uint4 vb = b4[chunk];
    uint4 vo;
    const T* ea = reinterpret_cast<const T*>(&va);
    const T* eb = reinterpret_cast<const T*>(&vb);
    T* eo = reinterpret_cast<T*>(&vo);
#pragma unroll
    for (int i = 0; i < kPerChunk; ++i) eo[i] = from_float<T>(to_float(ea[i]) + to_float(eb[i]));
    out4[chunk] = vo;
  }
  const long long tail = num_chunks * kPerChunk + first;
  if (tail < n && first < kPerChunk) out[tail] = from_float<T>(to_float(a[tail]) + to_float(b[tail]));
}

// The readable baseline, and the path for unaligned pointers: one element per thread per step.
template <typename T>
__global__ void vector_add_scalar_kernel(const T* __restrict__ a, const T* __restrict__ b,
                                         T* __restrict__ out, long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
    out[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}

}  // namespace gpuforge

#ifndef __CUDACC_RTC__
#include "launchers.h"

namespace gpuforge {

constexpr int kVectorAddThreads = 256;
constexpr long long kMaxBlocks = 1LL << 30;  // grid-stride loops cover anything beyond

cudaError_t launch_vector_add(const void* a, const void* b, void* out, int64_t n, DType dtype,
                              cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const bool vectorized = aligned16(a) && aligned16(b) && aligned16(out);
  return GF_DISPATCH_FLOAT_TYPES(dtype, [&] {
    const long long per_thread = vectorized ? 16 / sizeof(scalar_t) : 1;
    const long long work = (n + per_thread - 1) / per_thread;
    const long long blocks = std::min((work + kVectorAddThreads - 1) / kVectorAddThreads, kMaxBlocks);
    auto* pa = static_cast<const scalar_t*>(a);
    auto* pb = static_cast<const scalar_t*>(b);
    auto* po = static_cast<scalar_t*>(out);
    if (vectorized)
      vector_add_vec16_kernel<scalar_t><<<(unsigned)blocks, kVectorAddThreads, 0, stream>>>(pa, pb, po, n);
    else
      vector_add_scalar_kernel<scalar_t><<<(unsigned)blocks, kVectorAddThreads, 0, stream>>>(pa, pb, po, n);
    return cudaGetLastError();
  });
}

}  // namespace gpuforge
#endif
