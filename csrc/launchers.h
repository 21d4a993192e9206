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

}  // namespace gpuforge
