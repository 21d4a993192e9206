// Host launchers of every kernel in csrc/, called by bindings.cpp. Torch-free: raw device pointers, sizes,
// strides, a DType code and a stream. Each returns the first CUDA error it met (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

#include "dtype.h"

namespace gpuforge {

cudaError_t launch_vector_add(const void* a, const void* b, void* out, int64_t n, DType dtype,
                              cudaStream_t stream);

// c (batch, M, N, contiguous) = a (batch, M, K) @ b (batch, K, N); a and b with element strides (s*_z is 0
// for a broadcast operand). Tensor cores for fp16/bf16 where the layout allows, the tiled kernel otherwise.
cudaError_t launch_matmul(const void* a, const void* b, void* c, int64_t M, int64_t N, int64_t K, int64_t batch,
                          int64_t sa_z, int64_t sa_m, int64_t sa_k, int64_t sb_z, int64_t sb_k, int64_t sb_n,
                          DType dtype, cudaStream_t stream);

// out (M, N) = x (M, K) @ dequant(W)ᵀ, W (N, K) int4 (csrc/int4_matmul.cu for the format). split_k == 0: the
// tiled kernel (any M); split_k >= 1: the decode kernel (M <= 16, K and group_size multiples of 32, K / split_k
// a multiple of 32, 16-byte-aligned x and qweight) with `workspace` fp32 (split_k, M, N) when split_k > 1.
cudaError_t launch_int4_matmul(const void* x, const unsigned char* qweight, const void* scales,
                               const unsigned char* zeros, void* out, float* workspace, int64_t M, int64_t N,
                               int64_t K, int64_t group_size, int64_t split_k, DType x_dtype, DType scale_dtype,
                               cudaStream_t stream);

}  // namespace gpuforge
