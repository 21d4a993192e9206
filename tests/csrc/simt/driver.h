// Shared by the C drivers (tests/csrc/simt/<op>.cpp) that run csrc/ kernels through the SIMT emulator: the
// launchers' small helpers, which g++ cannot take from the .cu files (they sit behind __CUDACC_RTC__).
#pragma once

#include <cstdint>
#include <type_traits>

#include "simt.h"

namespace simt_driver {

inline unsigned cdiv(long long n, long long d) { return static_cast<unsigned>((n + d - 1) / d); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Calls fn(T{}) for a dtype code of csrc/dtype.h (0 fp32, 1 fp16, 2 bf16) and returns its result; 1 otherwise.
template <typename Fn>
int with_dtype(int dtype, Fn fn) {
  switch (dtype) {
    case 0: return fn(float{});
    case 1: return fn(__half{});
    case 2: return fn(__nv_bfloat16{});
  }
  return 1;
}

template <int C>
using Constant = std::integral_constant<int, C>;

}  // namespace simt_driver
