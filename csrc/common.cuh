// Shared device helpers for every gpuforge kernel. Compiles under nvcc and under NVRTC (the cupy backend),
// so host-only code is guarded by __CUDACC_RTC__.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>
#include <cstdint>

#include "dtype.h"

// Return the error of a CUDA call from the enclosing launcher (llm.c's cudaCheck, as a return value so the
// binding layer turns it into a Python exception instead of aborting the interpreter).
#define GF_CUDA_RETURN_IF_ERROR(call)      \
  do {                                     \
    cudaError_t gf_err__ = (call);         \
    if (gf_err__ != cudaSuccess) return gf_err__; \
  } while (0)

// Dispatch a runtime DType to a compile-time element type `scalar_t` (flash-attention's BOOL_SWITCH idea).
#define GF_DISPATCH_FLOAT_TYPES(dtype, ...)                                   \
  [&]() -> cudaError_t {                                                     \
    switch (dtype) {                                                         \
      case gpuforge::DType::Float32: { using scalar_t = float; return __VA_ARGS__(); }          \
      case gpuforge::DType::Float16: { using scalar_t = __half; return __VA_ARGS__(); }         \
      case gpuforge::DType::BFloat16: { using scalar_t = __nv_bfloat16; return __VA_ARGS__(); } \
    }                                                                        \
    return cudaErrorInvalidValue;                                            \
  }()
#endif

// Declares the kernel's dynamic shared memory (sized by the launch) as `type name[]`. A macro so that the
// SIMT emulator of the tests (tests/csrc/simt/simt.h), which defines it first, can give each launch a buffer.
#ifndef GF_DYNAMIC_SHARED
#define GF_DYNAMIC_SHARED(type, name) extern __shared__ __align__(128) type name[]
#endif

namespace gpuforge {

// Every kernel computes in fp32 and rounds once on store, as PyTorch does for fp16/bf16 elementwise ops.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Butterfly reductions over the 32 lanes of a warp, in registers: every lane ends with the result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// The same over the 4 lanes of a quad (lanes 4g..4g+3: the threads that share a row of an MMA fragment).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace gpuforge
