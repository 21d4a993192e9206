// C entry point that runs csrc/flash_attention_wgmma.cu's Hopper attention forward (TMA, mbarriers, wgmma with
// A from shared memory and from registers, a producer warpgroup and two consumers, a TMA-store epilogue) on
// the CPU through the SIMT emulator (simt.h, hopper.h), for tests/csrc/test_flash_attention_wgmma_simt.py. The
// tensor maps come from the launcher's own encoder (tensor_maps.h) through the emulator's
// cuTensorMapEncodeTiled; the grid is the launcher's.
#include <cstdio>

#include "driver.h"

#include "flash_attention_wgmma.cu"
#include "tensor_maps.h"

// p: heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left, window_right, then the (batch, head, row)
// element strides of q, k and v (as attention.cpp); dtype 1 (fp16) or 2 (bf16), D 128 and the launcher's
// alignment preconditions the caller's. Returns 0 on success, 1 for a bad argument, 2 when the kernel failed
// (printed).
extern "C" int gf_simt_attention_forward_wgmma(int dtype, const void* q, const void* k, const void* v, void* out,
                                               float* lse, long long batch, const long long* p, float scale) {
  using namespace gpuforge;
  if ((dtype != 1 && dtype != 2) || p[4] != kFa3HeadDim) return 1;
  const AttentionParams prm{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12],
                            p[13], p[14], p[15], scale};
  const int64_t q_strides[3] = {p[7], p[8], p[9]}, k_strides[3] = {p[10], p[11], p[12]},
                v_strides[3] = {p[13], p[14], p[15]};
  AttentionWgmmaMaps maps;
  if (encode_attention_wgmma_maps(cuTensorMapEncodeTiled, maps, q, k, v, out, batch, prm.heads_q, prm.heads_kv,
                                  prm.seqlen_q, prm.seqlen_k, prm.head_dim, q_strides, k_strides, v_strides,
                                  dtype == 2) != CUDA_SUCCESS)
    return 1;
  try {
    const dim3 grid{simt_driver::cdiv(prm.seqlen_q, kFa3BlockM), static_cast<unsigned>(batch * prm.heads_q), 1};
    const auto run = [&](auto kernel) {
      simt::launch(grid, dim3{kFa3Threads, 1, 1}, kFa3SharedBytes, kernel, maps.q, maps.k, maps.v, maps.out, lse,
                   prm);
    };
    if (dtype == 2) {
      run(flash_attention_fwd_wgmma_kernel<__nv_bfloat16>);
    } else {
      run(flash_attention_fwd_wgmma_kernel<__half>);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gf_simt_attention_forward_wgmma: %s\n", e.what());
    return 2;
  }
  return 0;
}
