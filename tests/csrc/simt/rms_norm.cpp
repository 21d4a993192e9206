// C entry points that run csrc/rms_norm.cu's kernels on the CPU through the SIMT emulator (simt.h), for
// tests/csrc/test_rms_norm_simt.py. Vector width, threads per block, the template switches and the dynamic
// shared memory (n floats of dw per block) mirror launch_rms_norm_forward / launch_rms_norm_backward.
#include <algorithm>
#include <initializer_list>

#include "driver.h"

#include "rms_norm.cu"

namespace {

using simt_driver::Constant;

// rms_norm_threads: one thread per chunk, in whole warps, 32 to 512.
unsigned threads_for(long long n, int vec) {
  const long long chunks = (n + vec - 1) / vec;
  return static_cast<unsigned>(std::min<long long>(std::max<long long>(32, (chunks + 31) / 32 * 32), 512));
}

// vec_width: 16 bytes when n, every pointer and every row stride allow it, else 1.
template <typename T>
int vec_width(long long n, std::initializer_list<const void*> ptrs, std::initializer_list<long long> strides) {
  constexpr int kVec = 16 / sizeof(T);
  if (n % kVec) return 1;
  for (const void* p : ptrs)
    if (p && !simt_driver::aligned16(p)) return 1;
  for (long long s : strides)
    if (s % kVec) return 1;
  return kVec;
}

template <typename T, typename Fn>
int with_vec(int vec, Fn fn) {
  constexpr int kVec = 16 / sizeof(T);
  return vec == kVec ? fn(Constant<kVec>{}) : fn(Constant<1>{});
}

template <typename Fn>
int with_flag(bool flag, Fn fn) {
  return flag ? fn(std::true_type{}) : fn(std::false_type{});
}

}  // namespace

// y (and h = x + residual when residual is not null) of (rows, n) rows, rstd (rows,). Returns 0 on success.
extern "C" int gf_simt_rms_norm_forward(int dtype, const void* x, long long x_row_stride, const void* residual,
                                        long long residual_row_stride, const void* weight, void* y, void* h,
                                        float* rstd, long long rows, long long n, float eps) {
  if (rows == 0) return 0;
  return simt_driver::with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const int vec =
        vec_width<T>(n, {x, residual, weight, y, h}, {x_row_stride, residual ? residual_row_stride : 0});
    const dim3 grid{static_cast<unsigned>(rows), 1, 1}, block{threads_for(n, vec), 1, 1};
    return with_vec<T>(vec, [&](auto v) {
      return with_flag(residual != nullptr, [&](auto has_residual) {
        simt::launch(grid, block, 0, gpuforge::rms_norm_forward_kernel<T, v.value, has_residual.value>,
                     static_cast<const T*>(x), x_row_stride, static_cast<const T*>(has_residual ? residual : x),
                     residual_row_stride, static_cast<const T*>(weight), static_cast<T*>(y), static_cast<T*>(h),
                     rstd, n, eps);
        return 0;
      });
    });
  });
}

// dx (rows, n) (+ dh when not null) and dw (n,) from `blocks` row bands; partial is fp32 (blocks, n) when
// deterministic, else (1, n) zeroed by the caller. Returns 0 on success.
extern "C" int gf_simt_rms_norm_backward(int dtype, const void* dy, long long dy_row_stride, const void* x,
                                         long long x_row_stride, const void* weight, const float* rstd,
                                         const void* dh, long long dh_row_stride, void* dx, void* dw,
                                         float* partial, int blocks, long long rows, long long n,
                                         bool deterministic) {
  return simt_driver::with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if (rows > 0) {
      const int vec =
          vec_width<T>(n, {dy, x, weight, dh, dx}, {dy_row_stride, x_row_stride, dh ? dh_row_stride : 0});
      const dim3 grid{static_cast<unsigned>(blocks), 1, 1}, block{threads_for(n, vec), 1, 1};
      with_vec<T>(vec, [&](auto v) {
        return with_flag(dh != nullptr, [&](auto has_dh) {
          return with_flag(!deterministic, [&](auto atomic) {
            simt::launch(grid, block, n * sizeof(float),
                         gpuforge::rms_norm_backward_kernel<T, v.value, has_dh.value, atomic.value>,
                         static_cast<const T*>(dy), dy_row_stride, static_cast<const T*>(x), x_row_stride,
                         static_cast<const T*>(weight), rstd, static_cast<const T*>(dh), dh_row_stride,
                         static_cast<T*>(dx), partial, rows, n);
            return 0;
          });
        });
      });
    }
    const long long num_partials = deterministic && rows > 0 ? blocks : 1;
    simt::launch(dim3{simt_driver::cdiv(n, 256), 1, 1}, dim3{256, 1, 1}, 0,
                 gpuforge::rms_norm_sum_partials_kernel<T>, static_cast<const float*>(partial), static_cast<T*>(dw),
                 num_partials, n);
    return 0;
  });
}
