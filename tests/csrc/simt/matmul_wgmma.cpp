// C entry point that runs csrc/matmul_wgmma.cu's Hopper kernel (TMA, mbarriers, wgmma, warp specialisation,
// persistent tiles, TMA-store epilogue) on the CPU through the SIMT emulator (simt.h, hopper.h), for
// tests/csrc/test_matmul_wgmma_simt.py. The tensor maps come from the launcher's own encoder
// (tensor_maps.h) through the emulator's cuTensorMapEncodeTiled.
#include <cstdio>

#include "driver.h"

#include "matmul_wgmma.cu"
#include "tensor_maps.h"

// c (batch, M, N, contiguous) = a (batch, M, K) @ b (batch, K, N), fp16 (dtype 1) or bf16 (2), the launcher's
// preconditions (rows contiguous, K, N and the strides multiples of 8, 16-byte aligned pointers) the caller's;
// `blocks` persistent blocks. Returns 0 on success, 1 for a bad argument, 2 when the kernel failed (printed).
extern "C" int gf_simt_matmul_wgmma(int dtype, const void* a, const void* b, void* c, long long M, long long N,
                                    long long K, long long batch, long long sa_z, long long sa_m, long long sb_z,
                                    long long sb_k, int blocks) {
  using namespace gpuforge;
  if (dtype != 1 && dtype != 2) return 1;
  MatmulWgmmaMaps maps;
  if (encode_matmul_wgmma_maps(cuTensorMapEncodeTiled, maps, a, b, c, M, N, K, batch, sa_z, sa_m, sb_z, sb_k,
                               dtype == 2) != CUDA_SUCCESS)
    return 1;
  try {
    const auto run = [&](auto kernel) {
      simt::launch(dim3{static_cast<unsigned>(blocks), 1, 1}, dim3{kWgmmaThreads, 1, 1}, kWgmmaSharedBytes, kernel,
                   maps.a, maps.b, maps.c, int(M), int(N), int(K), int(batch), int(sa_z != 0), int(sb_z != 0));
    };
    if (dtype == 2) {
      run(matmul_wgmma_kernel<__nv_bfloat16>);
    } else {
      run(matmul_wgmma_kernel<__half>);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gf_simt_matmul_wgmma: %s\n", e.what());
    return 2;
  }
  return 0;
}
