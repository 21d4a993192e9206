// Attention forward, the readable CUDA C++ baseline: one warp per query row, online softmax over the keys the
// row may see (bottom-right aligned window; causal is window_right = 0), GQA by head index mapping.
//
// Each lane holds D/32 elements of the (pre-scaled) query row and of the fp32 output accumulator in registers;
// a key's score is a warp-wide reduction with shuffles, so K and V rows are read as whole 32-lane coalesced
// segments. Rows of one block are consecutive queries of the same (batch, head), so the K/V rows they share
// are served by L1/L2. No tensor cores and no shared-memory tiling: this is the correctness baseline the
// Triton kernels (kernels/triton/flash_attention.py) are compared with, not the fast path.
#include "common.cuh"
#include "launchers.h"

namespace gpuforge {

namespace {

constexpr int kWarpsPerBlock = 4;

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// kPerLane = ceil(D / 32) rounded up to a power of two: the registers each lane keeps for q and the accumulator.
template <typename T, int kPerLane>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
flash_attention_fwd_rowwise_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                                   T* __restrict__ out, float* __restrict__ lse, AttentionShape shape,
                                   AttentionStrides strides, float scale) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int64_t bh = blockIdx.y;
  if (row >= shape.seqlen_q) return;  // whole warps exit together: the shuffles below stay full-warp
  const int64_t b = bh / shape.heads_q;
  const int64_t h = bh % shape.heads_q;
  const int64_t hk = h / (shape.heads_q / shape.heads_kv);
  const T* q_row = q + b * strides.q_b + h * strides.q_h + row * strides.q_s;
  const T* k_head = k + b * strides.k_b + hk * strides.k_h;
  const T* v_head = v + b * strides.v_b + hk * strides.v_h;

  float q_reg[kPerLane];
  float acc[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    q_reg[i] = d < shape.head_dim ? to_float(q_row[d]) * scale : 0.f;
    acc[i] = 0.f;
  }
  const int64_t diag = row + shape.seqlen_k - shape.seqlen_q;
  const int64_t lo = shape.window_left < 0 ? 0 : max(int64_t{0}, diag - shape.window_left);
  const int64_t hi = shape.window_right < 0 ? shape.seqlen_k : min(shape.seqlen_k, diag + shape.window_right + 1);

  float m = -INFINITY;
  float l = 0.f;
  for (int64_t j = lo; j < hi; ++j) {
    const T* k_row = k_head + j * strides.k_s;
    const T* v_row = v_head + j * strides.v_s;
    float partial = 0.f;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      if (d < shape.head_dim) partial += q_reg[i] * to_float(k_row[d]);
    }
    const float s = warp_sum(partial);
    const float m_new = fmaxf(m, s);
    const float alpha = __expf(m - m_new);  // m = -inf on the first key: alpha = 0
    const float p = __expf(s - m_new);
    l = l * alpha + p;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int64_t d = lane + 32 * i;
      acc[i] = acc[i] * alpha + (d < shape.head_dim ? p * to_float(v_row[d]) : 0.f);
    }
    m = m_new;
  }
  const float inv_l = l > 0.f ? 1.f / l : 0.f;  // a row that sees no key gets zeros and LSE -inf
  T* out_row = out + (bh * shape.seqlen_q + row) * shape.head_dim;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int64_t d = lane + 32 * i;
    if (d < shape.head_dim) out_row[d] = from_float<T>(acc[i] * inv_l);
  }
  if (lane == 0) lse[bh * shape.seqlen_q + row] = l > 0.f ? m + logf(l) : -INFINITY;
}

template <typename T, int kPerLane>
cudaError_t launch_rowwise(const void* q, const void* k, const void* v, void* out, float* lse,
                           const AttentionShape& shape, const AttentionStrides& strides, float scale,
                           cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((shape.seqlen_q + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>(shape.batch * shape.heads_q));
  flash_attention_fwd_rowwise_kernel<T, kPerLane><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), static_cast<T*>(out), lse,
      shape, strides, scale);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_flash_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                                           const AttentionShape& shape, const AttentionStrides& strides,
                                           float scale, DType dtype, cudaStream_t stream) {
  if (shape.seqlen_q == 0 || shape.batch * shape.heads_q == 0) return cudaSuccess;
  if (shape.head_dim < 1 || shape.head_dim > 256 || shape.heads_kv < 1 || shape.heads_q % shape.heads_kv)
    return cudaErrorInvalidValue;
  return GF_DISPATCH_FLOAT_TYPES(dtype, [&]() -> cudaError_t {
    // the per-lane register arrays are sized at compile time: D <= 32, 64, 128, 256
    if (shape.head_dim <= 32) return launch_rowwise<scalar_t, 1>(q, k, v, out, lse, shape, strides, scale, stream);
    if (shape.head_dim <= 64) return launch_rowwise<scalar_t, 2>(q, k, v, out, lse, shape, strides, scale, stream);
    if (shape.head_dim <= 128) return launch_rowwise<scalar_t, 4>(q, k, v, out, lse, shape, strides, scale, stream);
    return launch_rowwise<scalar_t, 8>(q, k, v, out, lse, shape, strides, scale, stream);
  });
}

}  // namespace gpuforge
