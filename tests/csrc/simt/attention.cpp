// C entry points that run csrc/flash_attention.cu's forward kernels (the row-per-warp baseline and the
// tensor-core FlashAttention-2 kernel), csrc/flash_attention_bwd.cu's backward kernels and
// csrc/flash_attention_bwd_mma.cu's tensor-core ones on the CPU through the
// SIMT emulator (simt.h, ptx.h), for tests/csrc/test_attention_simt.py. The grids and
// the dispatch on head_dim mirror the launchers in those files (which g++ cannot compile: <<<...>>>).
#include "driver.h"

#include "flash_attention.cu"
#include "flash_attention_bwd.cu"
#include "flash_attention_bwd_mma.cu"

namespace {

using gpuforge::AttentionParams;

AttentionParams params(const long long* p, float scale) {
  return {p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12], p[13], p[14], p[15],
          scale};
}

using simt_driver::cdiv;
using simt_driver::Constant;

// Calls fn(T{}, Constant<kPerLane>{}) for the dtype code and D.
template <typename Fn>
int dispatch(int dtype, long long head_dim, Fn fn) {
  return simt_driver::with_dtype(dtype, [&](auto t) {
    if (head_dim <= 32) return fn(t, Constant<1>{});
    if (head_dim <= 64) return fn(t, Constant<2>{});
    if (head_dim <= 128) return fn(t, Constant<4>{});
    return fn(t, Constant<8>{});
  });
}

constexpr int kThreads = 128;  // 4 warps, as kAttentionWarpsPerBlock and kAttnBwdWarpsPerBlock

}  // namespace

// p: heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left, window_right, then the (batch, head, row)
// element strides of q, k and v. Returns 0 on success.
extern "C" int gf_simt_attention_forward(int dtype, const void* q, const void* k, const void* v, void* out,
                                         float* lse, long long batch, const long long* p, float scale) {
  const AttentionParams prm = params(p, scale);
  return dispatch(dtype, prm.head_dim, [&](auto t, auto per_lane) {
    using T = decltype(t);
    const dim3 grid{cdiv(prm.seqlen_q, 4), static_cast<unsigned>(batch * prm.heads_q), 1};
    simt::launch(grid, dim3{kThreads, 1, 1}, 0, gpuforge::flash_attention_fwd_rowwise_kernel<T, per_lane.value>,
                 static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out),
                 lse, prm);
    return 0;
  });
}

extern "C" int gf_simt_attention_backward(int dtype, const void* q, const void* k, const void* v, const void* out,
                                          const void* dout, const float* lse, const float* dlse, void* dq, void* dk,
                                          void* dv, float* delta, long long batch, const long long* p, float scale) {
  const AttentionParams prm = params(p, scale);
  return dispatch(dtype, prm.head_dim, [&](auto t, auto per_lane) {
    using T = decltype(t);
    constexpr int kPerLane = per_lane.value;
    const auto* qt = static_cast<const T*>(q);
    const auto* kt = static_cast<const T*>(k);
    const auto* vt = static_cast<const T*>(v);
    const auto* dot = static_cast<const T*>(dout);
    const dim3 rows{cdiv(prm.seqlen_q, 4), static_cast<unsigned>(batch * prm.heads_q), 1};
    const dim3 keys{cdiv(prm.seqlen_k, 4), static_cast<unsigned>(batch * prm.heads_kv), 1};
    const dim3 block{kThreads, 1, 1};
    simt::launch(rows, block, 0, gpuforge::flash_attention_bwd_delta_kernel<T, kPerLane>,
                 static_cast<const T*>(out), dot, dlse, delta, prm);
    simt::launch(rows, block, 0, gpuforge::flash_attention_bwd_dq_kernel<T, kPerLane>, qt, kt, vt, dot, lse, delta,
                 static_cast<T*>(dq), prm);
    simt::launch(keys, block, 0, gpuforge::flash_attention_bwd_dkdv_kernel<T, kPerLane>, qt, kt, vt, dot, lse,
                 delta, static_cast<T*>(dk), static_cast<T*>(dv), prm);
    return 0;
  });
}

// The tensor-core forward (fp16/bf16, D 64 or 128; the caller meets the launcher's alignment preconditions).
extern "C" int gf_simt_attention_forward_mma(int dtype, const void* q, const void* k, const void* v, void* out,
                                             float* lse, long long batch, const long long* p, float scale) {
  const AttentionParams prm = params(p, scale);
  if (dtype == 0 || (prm.head_dim != 64 && prm.head_dim != 128)) return 1;
  return simt_driver::with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      return 1;
    } else {
      auto run = [&](auto d) {
        constexpr int kD = decltype(d)::value;
        const size_t smem = 2 * gpuforge::kFaStages * gpuforge::kFaBlockN * kD * sizeof(T);
        const dim3 grid{cdiv(prm.seqlen_q, gpuforge::kFaBlockM), static_cast<unsigned>(batch * prm.heads_q), 1};
        simt::launch(grid, dim3{gpuforge::kFaThreads, 1, 1}, smem, gpuforge::flash_attention_fwd_mma_kernel<T, kD>,
                     static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                     static_cast<T*>(out), lse, prm);
        return 0;
      };
      return prm.head_dim == 64 ? run(Constant<64>{}) : run(Constant<128>{});
    }
  });
}

// The tensor-core backward: flash_attention_bwd.cu's delta kernel, then flash_attention_bwd_mma.cu's dQ and
// dK/dV kernels (fp16/bf16, D 64 or 128; the caller meets the launcher's alignment preconditions).
extern "C" int gf_simt_attention_backward_mma(int dtype, const void* q, const void* k, const void* v,
                                              const void* out, const void* dout, const float* lse, const float* dlse,
                                              void* dq, void* dk, void* dv, float* delta, long long batch,
                                              const long long* p, float scale) {
  const AttentionParams prm = params(p, scale);
  if (dtype == 0 || (prm.head_dim != 64 && prm.head_dim != 128)) return 1;
  return simt_driver::with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    if constexpr (std::is_same_v<T, float>) {
      return 1;
    } else {
      auto run = [&](auto d) {
        constexpr int kD = decltype(d)::value;
        const auto* qt = static_cast<const T*>(q);
        const auto* kt = static_cast<const T*>(k);
        const auto* vt = static_cast<const T*>(v);
        const auto* dot = static_cast<const T*>(dout);
        const size_t smem = gpuforge::bwd_mma_shared_bytes<kD, T>();
        const dim3 block{gpuforge::kBwdThreads, 1, 1};
        simt::launch(dim3{cdiv(prm.seqlen_q, 4), static_cast<unsigned>(batch * prm.heads_q), 1}, block, 0,
                     gpuforge::flash_attention_bwd_delta_kernel<T, kD / 32>, static_cast<const T*>(out), dot, dlse,
                     delta, prm);
        simt::launch(dim3{cdiv(prm.seqlen_q, gpuforge::kBwdOwnRows), static_cast<unsigned>(batch * prm.heads_q), 1},
                     block, smem, gpuforge::flash_attention_bwd_dq_mma_kernel<T, kD>, qt, kt, vt, dot, lse, delta,
                     static_cast<T*>(dq), prm);
        simt::launch(dim3{cdiv(prm.seqlen_k, gpuforge::kBwdOwnRows), static_cast<unsigned>(batch * prm.heads_kv), 1},
                     block, smem, gpuforge::flash_attention_bwd_dkdv_mma_kernel<T, kD>, qt, kt, vt, dot, lse, delta,
                     static_cast<T*>(dk), static_cast<T*>(dv), prm);
        return 0;
      };
      return prm.head_dim == 64 ? run(Constant<64>{}) : run(Constant<128>{});
    }
  });
}
