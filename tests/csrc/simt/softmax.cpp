// C entry points that run csrc/softmax.cu's kernels on the CPU through the SIMT emulator (simt.h), for
// tests/csrc/test_softmax_simt.py. The choice of kernel (warp per row, cached block per row, streaming block),
// of vector width and of chunks per thread mirrors forward_typed / backward_typed / with_chunks there.
#include "driver.h"

#include "softmax.cu"

namespace {

using simt_driver::Constant;

// launch(Constant<C>) with the fewest chunks C in {1, 2, 4, 8}, C <= kMax, with n <= C * per_chunk, else C = 0.
template <int kMax, class Launch>
int with_chunks(long long n, long long per_chunk, Launch&& launch) {
  if (n <= per_chunk) return launch(Constant<1>{});
  if (n <= 2 * per_chunk) return launch(Constant<2>{});
  if constexpr (kMax >= 4) {
    if (n <= 4 * per_chunk) return launch(Constant<4>{});
  }
  if constexpr (kMax >= 8) {
    if (n <= 8 * per_chunk) return launch(Constant<8>{});
  }
  return launch(Constant<0>{});
}

// The warp kernel (kWarpsPerBlock rows per block) for rows of up to 32 * kMaxWarpChunks chunks, else the
// 512-thread block kernel (kMaxBlockChunks chunks cached per thread, or streaming); args after (rows, n) omitted.
template <int kVec, int kMaxBlockChunks, template <int, int> class Kernels, typename... Args>
int launch_rows(long long rows, long long n, Args... args) {
  using namespace gpuforge;
  if (n <= 32LL * kMaxWarpChunks * kVec) {
    const dim3 grid{simt_driver::cdiv(rows, kWarpsPerBlock), 1, 1}, block{32 * kWarpsPerBlock, 1, 1};
    return with_chunks<kMaxWarpChunks>(n, 32LL * kVec, [&](auto chunks) {
      if constexpr (chunks.value > 0)  // always: n fits the warp's chunks
        simt::launch(grid, block, 0, Kernels<chunks.value, kVec>::warp, args..., rows, n);
      return 0;
    });
  }
  const dim3 grid{static_cast<unsigned>(rows), 1, 1}, block{kRowBlockThreads, 1, 1};
  return with_chunks<kMaxBlockChunks>(n, 1LL * kRowBlockThreads * kVec, [&](auto chunks) {
    simt::launch(grid, block, 0, Kernels<chunks.value, kVec>::block, args..., rows, n);
    return 0;
  });
}

template <typename T>
struct Forward {
  template <int kChunks, int kVec>
  struct Kernels {
    static constexpr auto warp = gpuforge::softmax_fwd_warp_kernel<T, kChunks, kVec>;
    static constexpr auto block = gpuforge::softmax_fwd_block_kernel<T, kChunks, kVec>;
  };
};

template <typename T>
struct Backward {
  template <int kChunks, int kVec>
  struct Kernels {
    static constexpr auto warp = gpuforge::softmax_bwd_warp_kernel<T, kChunks, kVec>;
    static constexpr auto block = gpuforge::softmax_bwd_block_kernel<T, kChunks, kVec>;
  };
};

}  // namespace

// y (rows, n, contiguous) = softmax of x (rows, n) with row stride x_row_stride. Returns 0 on success.
extern "C" int gf_simt_softmax_forward(int dtype, const void* x, long long x_row_stride, void* y, long long rows,
                                       long long n) {
  using simt_driver::aligned16;
  if (rows == 0 || n == 0) return 0;
  return simt_driver::with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    auto* px = static_cast<const T*>(x);
    auto* py = static_cast<T*>(y);
    if (aligned16(x) && aligned16(y) && x_row_stride % kVec == 0 && n % kVec == 0)
      return launch_rows<kVec, gpuforge::kMaxBlockChunksFwd, Forward<T>::template Kernels>(rows, n, px,
                                                                                          x_row_stride, py);
    return launch_rows<1, gpuforge::kMaxBlockChunksFwd, Forward<T>::template Kernels>(rows, n, px, x_row_stride,
                                                                                     py);
  });
}

// dx (rows, n, contiguous) = y * (dy - sum(dy * y)), dy with row stride dy_row_stride, y contiguous.
extern "C" int gf_simt_softmax_backward(int dtype, const void* dy, long long dy_row_stride, const void* y, void* dx,
                                        long long rows, long long n) {
  using simt_driver::aligned16;
  if (rows == 0 || n == 0) return 0;
  return simt_driver::with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    constexpr int kVec = 16 / sizeof(T);
    auto* pdy = static_cast<const T*>(dy);
    auto* py = static_cast<const T*>(y);
    auto* pdx = static_cast<T*>(dx);
    if (aligned16(dy) && aligned16(y) && aligned16(dx) && dy_row_stride % kVec == 0 && n % kVec == 0)
      return launch_rows<kVec, gpuforge::kMaxBlockChunksBwd, Backward<T>::template Kernels>(rows, n, pdy,
                                                                                           dy_row_stride, py, pdx);
    return launch_rows<1, gpuforge::kMaxBlockChunksBwd, Backward<T>::template Kernels>(rows, n, pdy, dy_row_stride,
                                                                                      py, pdx);
  });
}
