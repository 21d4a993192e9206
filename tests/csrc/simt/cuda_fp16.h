// Host stand-in for CUDA's cuda_fp16.h, for the SIMT emulator (simt.h): __half is IEEE binary16 stored as its
// bits (the layout of torch.float16), converted with round-to-nearest-even by the compiler's _Float16. The
// half2 arithmetic rounds each lane once, as the GPU does: a sum or difference of halves is exact in double,
// and a fused multiply-add is rounded to odd in double first, which makes the final rounding to half exact.
#pragma once

#include <cmath>
#include <cstring>

#include "vector_types.h"

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
inline __half __double2half_rn(double x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline __half __float2half_rn(float x) { return __double2half_rn(x); }
inline __half2 __floats2half2_rn(float x, float y) { return {__float2half_rn(x), __float2half_rn(y)}; }
inline __half2 __float2half2_rn(float x) { return {__float2half_rn(x), __float2half_rn(x)}; }
inline __half2 __half2half2(__half h) { return {h, h}; }
inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }

inline __half2 __hsub2(__half2 a, __half2 b) {
  auto sub = [](__half p, __half q) { return __double2half_rn(double(__half2float(p)) - __half2float(q)); };
  return {sub(a.x, b.x), sub(a.y, b.y)};
}

// a * b + c with one rounding to half: the product is exact in double; the sum is rounded to odd (the exact
// error from TwoSum says whether the double is inexact), and 53 >= 2 * 11 + 2 bits make the last rounding exact.
inline __half __hfma(__half a, __half b, __half c) {
  const double p = double(__half2float(a)) * __half2float(b), q = __half2float(c);
  double s = p + q;
  const double bp = s - q, error = (p - bp) + (q - (s - bp));
  long long bits;
  std::memcpy(&bits, &s, 8);
  if (error != 0 && (bits & 1) == 0) s = std::nextafter(s, error > 0 ? INFINITY : -INFINITY);
  return __double2half_rn(s);
}
inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) { return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; }
