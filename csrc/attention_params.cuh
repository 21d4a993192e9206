// The problem description shared by the attention kernels (flash_attention.cu, flash_attention_bwd.cu) and the
// visibility rule of the bottom-right aligned window, from both sides: the keys a query row sees and the query
// rows that see a key. Causal is window_right = 0; -1 means unbounded on that side. NVRTC-compatible.
#pragma once

#ifndef __CUDACC_RTC__
#include <cstdint>
#endif

namespace gpuforge {

// Sizes, window and element strides over (batch, head, row); D has unit stride. Query i sees key j when
// i + (seqlen_k - seqlen_q) - window_left <= j <= i + (seqlen_k - seqlen_q) + window_right (-1: unbounded).
struct AttentionParams {
  long long heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left, window_right;
  long long q_b, q_h, q_s, k_b, k_h, k_s, v_b, v_h, v_s;
  float scale;
};

// [lo, hi): the keys query `row` sees (empty when lo >= hi).
__device__ __forceinline__ void visible_keys(const AttentionParams& prm, long long row, long long& lo,
                                             long long& hi) {
  const long long diag = row + prm.seqlen_k - prm.seqlen_q;
  lo = prm.window_left < 0 ? 0 : max(0LL, diag - prm.window_left);
  hi = prm.window_right < 0 ? prm.seqlen_k : min(prm.seqlen_k, diag + prm.window_right + 1);
}

// [lo, hi): the query rows that see key `key` (the same rule solved for i).
__device__ __forceinline__ void rows_seeing_key(const AttentionParams& prm, long long key, long long& lo,
                                                long long& hi) {
  const long long anti = key - (prm.seqlen_k - prm.seqlen_q);  // the row whose diagonal is this key
  lo = prm.window_right < 0 ? 0 : max(0LL, anti - prm.window_right);
  hi = prm.window_left < 0 ? prm.seqlen_q : min(prm.seqlen_q, anti + prm.window_left + 1);
}

#ifndef __CUDACC_RTC__
// The launchers' arguments as AttentionParams: sizes, window, and each of q, k, v's strides over (batch, head, row).
inline AttentionParams attention_params(int64_t heads_q, int64_t heads_kv, int64_t seqlen_q, int64_t seqlen_k,
                                        int64_t head_dim, int64_t window_left, int64_t window_right,
                                        const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides,
                                        float scale) {
  return {heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left, window_right,
          q_strides[0], q_strides[1], q_strides[2], k_strides[0], k_strides[1], k_strides[2],
          v_strides[0], v_strides[1], v_strides[2], scale};
}
#endif

}  // namespace gpuforge
