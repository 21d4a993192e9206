// Element types crossing the Python/C++ boundary, as small integer codes (torch-free).
// The Python side maps torch dtypes to these codes in gpuforge.kernels.cuda_ext.
#pragma once

namespace gpuforge {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2 };

inline const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
  }
  return "unknown";
}

}  // namespace gpuforge
