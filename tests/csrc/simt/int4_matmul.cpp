// C entry point that runs csrc/int4_matmul.cu's kernels on the CPU through the SIMT emulator (simt.h), for
// tests/csrc/test_int4_matmul_simt.py: the tiled kernel (split_k == 0) or the decode kernel with its rows per
// warp (kM) and split-K reduction, as launch_int4_matmul dispatches them. The decode's lop3 PTX is rewritten
// into simt::lop3 by the build (tests/csrc/simt_build.py); __ldcs is a plain load here.
#include "driver.h"

#include "int4_matmul.cu"

namespace {

using simt_driver::Constant;

// launch_decode: the grid (8 output channels per block, split_k slices of K) and the split-K reduction.
template <typename T, typename S, int kM>
int decode(const T* x, const unsigned char* qweight, const S* scales, const unsigned char* zeros, T* out,
           float* workspace, long long M, long long N, long long K, long long group_size, long long split_k) {
  using namespace gpuforge;
  const dim3 grid{simt_driver::cdiv(N, kDecodeWarps), static_cast<unsigned>(split_k), 1};
  simt::launch(grid, dim3{kDecodeWarps * 32, 1, 1}, 0, int4_matmul_decode_kernel<T, S, kM>, x, qweight, scales,
               zeros, out, workspace, static_cast<int>(M), static_cast<int>(N), static_cast<int>(K),
               static_cast<int>(group_size), static_cast<int>(K / split_k));
  if (split_k > 1)
    simt::launch(dim3{simt_driver::cdiv(M * N, 256), 1, 1}, dim3{256, 1, 1}, 0, int4_matmul_split_reduce_kernel<T>,
                 static_cast<const float*>(workspace), out, M * N, static_cast<int>(split_k));
  return 0;
}

// fn(T{}) for a 16-bit activation dtype code (1 fp16, 2 bf16); 1 for anything else (the bindings reject fp32).
template <typename Fn>
int with_activation_dtype(int dtype, Fn fn) {
  if (dtype == 1) return fn(__half{});
  if (dtype == 2) return fn(__nv_bfloat16{});
  return 1;
}

// The smallest instantiated kM >= M: 1, 2, 4, 8 or 16.
template <typename Fn>
int with_rows(long long M, Fn fn) {
  if (M <= 1) return fn(Constant<1>{});
  if (M <= 2) return fn(Constant<2>{});
  if (M <= 4) return fn(Constant<4>{});
  if (M <= 8) return fn(Constant<8>{});
  return fn(Constant<16>{});
}

}  // namespace

// out (M, N) = x (M, K) @ dequant(W)^T; x_dtype 1 or 2 (fp16, bf16), scale_dtype 0, 1 or 2. workspace is fp32
// (split_k, M, N) when split_k > 1. Returns 0 on success.
extern "C" int gf_simt_int4_matmul(int x_dtype, int scale_dtype, const void* x, const unsigned char* qweight,
                                   const void* scales, const unsigned char* zeros, void* out, float* workspace,
                                   long long M, long long N, long long K, long long group_size, long long split_k) {
  if (M == 0 || N == 0) return 0;
  return with_activation_dtype(x_dtype, [&](auto t) {
    using T = decltype(t);
    return simt_driver::with_dtype(scale_dtype, [&](auto s) {
      using S = decltype(s);
      auto* px = static_cast<const T*>(x);
      auto* ps = static_cast<const S*>(scales);
      auto* po = static_cast<T*>(out);
      if (split_k == 0) {
        const dim3 grid{simt_driver::cdiv(N, gpuforge::kTileN), simt_driver::cdiv(M, gpuforge::kTileM), 1};
        simt::launch(grid, dim3{gpuforge::kThreads, 1, 1}, 0, gpuforge::int4_matmul_tiled_kernel<T, S>, px, qweight,
                     ps, zeros, po, M, N, K, group_size);
        return 0;
      }
      return with_rows(M, [&](auto rows) {
        return decode<T, S, rows.value>(px, qweight, ps, zeros, po, workspace, M, N, K, group_size, split_k);
      });
    });
  });
}
