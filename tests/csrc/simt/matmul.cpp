// C entry point that runs csrc/matmul.cu's tiled kernel on the CPU through the SIMT emulator (simt.h), for
// tests/csrc/test_matmul_simt.py, with launch_matmul's grid. The tensor-core kernel is inline PTX (mma.sync,
// cp.async, ldmatrix): the emulator cannot run it, and it compiles to an empty body here.
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
