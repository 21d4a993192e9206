// Attention forward, the readable CUDA C++ baseline: one warp per query row, online softmax over the keys the
// row may see (bottom-right aligned window; causal is window_right = 0), GQA by head index mapping.
//
// Each lane holds D/32 elements of the (pre-scaled) query row and of the fp32 output accumulator in registers;
// a key's score is a warp-wide reduction with shuffles, so K and V rows are read as whole 32-lane coalesced
// segments. Rows of one block are consecutive queries of the same (batch, head), so the K/V rows they share
// are served by L1/L2. No tensor cores and no shared-memory tiling: this is the correctness baseline the
// Triton kernels (kernels/triton/flash_attention.py) are compared with, not the fast path.
#include "common.cuh"

namespace gpuforge {

constexpr int kAttentionWarpsPerBlock = 4;

// Sizes, window and element strides over (batch, head, row); D has unit stride. Query i sees key j when
// i + (seqlen_k - seqlen_q) - window_left <= j <= i + (seqlen_k - seqlen_q) + window_right (-1: unbounded).
struct AttentionParams {
  long long heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left, window_right;
  long long q_b, q_h, q_s, k_b, k_h, k_s, v_b, v_h, v_s;
  float scale;
};

static __device__ __forceinline__ float attention_warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// kPerLane = ceil(D / 32) rounded up to a power of two: the registers each lane keeps for q and the accumulator.
template <typename T, int kPerLane>
__global__ void __launch_bounds__(kAttentionWarpsPerBlock * 32)
flash_attention_fwd_rowwise_kernel(const T* __restrict__ q,  // (B, Hq, Sq, D) strided
                                   const T* __restrict__ k,  // (B, Hkv, Sk, D) strided
                                   const T* __restrict__ v,  // (B, Hkv, Sk, D) strided
                                   T* __restrict__ out,      // (B, Hq, Sq, D) contiguous
                                   float* __restrict__ lse,  // (B, Hq, Sq) natural log
                                   AttentionParams prm) {
  const int lane = threadIdx.x % 32;
  const long long row = static_cast<long long>(blockIdx.x) * kAttentionWarpsPerBlock + threadIdx.x / 32;
  const long long bh = blockIdx.y;
  if (row >= prm.seqlen_q) return;  // whole warps exit together: the shuffles below stay full-warp
  const long long b = bh / prm.heads_q;
  const long long h = bh % prm.heads_q;
  const long long hk = h / (prm.heads_q / prm.heads_kv);
  const T* q_row = q + b * prm.q_b + h * prm.q_h + row * prm.q_s;
  const T* k_head = k + b * prm.k_b + hk * prm.k_h;
  const T* v_head = v + b * prm.v_b + hk * prm.v_h;

  float q_reg[kPerLane];
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const long long d = lane + 32 * i;
    q_reg[i] = d < prm.head_dim ? to_float(q_row[d]) * prm.scale : 0.f;
    acc[i] = 0.f;
  }
  const long long diag = row + prm.seqlen_k - prm.seqlen_q;
  const long long lo = prm.window_left < 0 ? 0 : max(0LL, diag - prm.window_left);
  const long long hi = prm.window_right < 0 ? prm.seqlen_k : min(prm.seqlen_k, diag + prm.window_right + 1);

  float m = -INFINITY;
  float l = 0.f;
  for (long long j = lo; j < hi; ++j) {
    const T* k_row = k_head + j * prm.k_s;
    const T* v_row = v_head + j * prm.v_s;
    float partial = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const long long d = lane + 32 * i;
      if (d < prm.head_dim) partial += q_reg[i] * to_float(k_row[d]);
    }
    const float s = attention_warp_sum(partial);
    const float m_new = fmaxf(m, s);
    const float alpha = __expf(m - m_new);  // m = -inf on the first key: alpha = 0
    const float p = __expf(s - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const long long d = lane + 32 * i;
      acc[i] = acc[i] * alpha + (d < prm.head_dim ? p * to_float(v_row[d]) : 0.f);
    }
    m = m_new;
  }
  const float inv_l = l > 0.f ? 1.f / l : 0.f;  // a row that sees no key gets zeros and LSE -inf
  T* out_row = out + (bh * prm.seqlen_q + row) * prm.head_dim;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const long long d = lane + 32 * i;
    if (d < prm.head_dim) out_row[d] = from_float<T>(acc[i] * inv_l);
  }
  if (lane == 0) lse[bh * prm.seqlen_q + row] = l > 0.f ? m + logf(l) : -INFINITY;
}

#ifndef __CUDACC_RTC__
}  // namespace gpuforge

#include "launchers.h"

namespace gpuforge {

namespace {

template <typename T, int kPerLane>
cudaError_t launch_rowwise(const void* q, const void* k, const void* v, void* out, float* lse, int64_t batch,
                           const AttentionParams& prm, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((prm.seqlen_q + kAttentionWarpsPerBlock - 1) / kAttentionWarpsPerBlock),
                  static_cast<unsigned>(batch * prm.heads_q));
  flash_attention_fwd_rowwise_kernel<T, kPerLane><<<grid, kAttentionWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out), lse,
      prm);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_flash_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                                           int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
                                           int64_t seqlen_k, int64_t head_dim, int64_t window_left,
                                           int64_t window_right, const int64_t* q_strides, const int64_t* k_strides,
                                           const int64_t* v_strides, float scale, DType dtype,
                                           cudaStream_t stream) {
  if (seqlen_q == 0 || batch * heads_q == 0) return cudaSuccess;
  if (head_dim < 1 || head_dim > 256 || heads_kv < 1 || heads_q % heads_kv) return cudaErrorInvalidValue;
  const AttentionParams prm{heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left, window_right,
                            q_strides[0], q_strides[1], q_strides[2], k_strides[0], k_strides[1], k_strides[2],
                            v_strides[0], v_strides[1], v_strides[2], scale};
  return GF_DISPATCH_FLOAT_TYPES(dtype, [&]() -> cudaError_t {
    // the per-lane register arrays are sized at compile time: D <= 32, 64, 128, 256
    if (head_dim <= 32) return launch_rowwise<scalar_t, 1>(q, k, v, out, lse, batch, prm, stream);
    if (head_dim <= 64) return launch_rowwise<scalar_t, 2>(q, k, v, out, lse, batch, prm, stream);
    if (head_dim <= 128) return launch_rowwise<scalar_t, 4>(q, k, v, out, lse, batch, prm, stream);
    return launch_rowwise<scalar_t, 8>(q, k, v, out, lse, batch, prm, stream);
  });
}
#endif  // __CUDACC_RTC__

}  // namespace gpuforge
