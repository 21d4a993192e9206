// Host stand-in for CUDA's cuda_fp16.h, for the SIMT emulator (simt.h): __half is IEEE binary16 stored as its
// bits (the layout of torch.float16), converted with round-to-nearest-even by the compiler's _Float16.
#pragma once

#include <cstring>

struct __half {
  unsigned short bits;
};
struct __half2 {
  __half x, y;
};

inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half_rn(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline __half2 __floats2half2_rn(float x, float y) { return {__float2half_rn(x), __float2half_rn(y)}; }
