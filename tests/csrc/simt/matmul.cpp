// C entry points that run csrc/matmul.cu's kernels on the CPU through the SIMT emulator (simt.h, ptx.h), for
// tests/csrc/test_matmul_simt.py, with launch_matmul's grids: the tiled kernel, and the tensor-core kernel
// (mma.sync m16n8k16, ldmatrix, 3-stage cp.async pipeline) whose PTX the emulator runs.
#include "driver.h"

#include "matmul.cu"

// c (batch, M, N, contiguous) = a (batch, M, K) @ b (batch, K, N), operands with element strides (0 for a
// broadcast batch). Returns 0 on success.
extern "C" int gf_simt_matmul_tiled(int dtype, const void* a, const void* b, void* c, long long M, long long N,
                                    long long K, long long batch, long long sa_z, long long sa_m, long long sa_k,
                                    long long sb_z, long long sb_k, long long sb_n) {
  using namespace gpuforge;
  if (M == 0 || N == 0 || batch == 0) return 0;
  return simt_driver::with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const long long tiles = simt_driver::cdiv(M, kTiledBlockM) * simt_driver::cdiv(N, kTiledBlockN);
    simt::launch(dim3{static_cast<unsigned>(tiles), static_cast<unsigned>(batch), 1}, dim3{kTiledThreads, 1, 1}, 0,
                 matmul_tiled_kernel<T>, static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(c), M,
                 N, K, sa_z, sa_m, sa_k, sb_z, sb_k, sb_n);
    return 0;
  });
}

// The tensor-core kernel (fp16/bf16 only): the launcher's preconditions are the caller's (rows contiguous along K
// and N, K, N and the strides multiples of 8, 16-byte aligned pointers). Returns 0 on success.
extern "C" int gf_simt_matmul_mma(int dtype, const void* a, const void* b, void* c, long long M, long long N,
                                  long long K, long long batch, long long sa_z, long long sa_m, long long sb_z,
                                  long long sb_k) {
  using namespace gpuforge;
  if (dtype == 0) return 1;
  if (M == 0 || N == 0 || batch == 0) return 0;
  return simt_driver::with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      return 1;
    } else {
      const long long tiles = simt_driver::cdiv(M, kMmaBlockM) * simt_driver::cdiv(N, kMmaBlockN);
      simt::launch(dim3{static_cast<unsigned>(tiles), static_cast<unsigned>(batch), 1}, dim3{kMmaThreads, 1, 1}, 0,
                   matmul_mma_kernel<T>, static_cast<const T*>(a), static_cast<const T*>(b), static_cast<T*>(c), M,
                   N, K, sa_z, sa_m, sb_z, sb_k);
      return 0;
    }
  });
}
