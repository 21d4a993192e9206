// Host launchers of every kernel in csrc/, called by bindings.cpp. Torch-free: raw device pointers, sizes,
// strides, a DType code and a stream. Each returns the first CUDA error it met (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

#include "dtype.h"

namespace gpuforge {

cudaError_t launch_vector_add(const void* a, const void* b, void* out, int64_t n, DType dtype,
                              cudaStream_t stream);

}  // namespace gpuforge
