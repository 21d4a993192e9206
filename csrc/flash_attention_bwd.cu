// Attention backward (FlashAttention-2's recomputation: nothing S x S is stored or read). From q, k, v, the
// forward's output and its log-sum-exp, every probability is recomputed as P_ij = exp(scale q_i.k_j - lse_i),
// and with delta_i = rowsum(dO_i * O_i) - dlse_i (the LSE's own gradient folds in here):
//   dV_j = sum_i P_ij dO_i,   dS_ij = P_ij (dO_i.V_j - delta_i),
//   dQ_i = scale sum_j dS_ij K_j,   dK_j = scale sum_i dS_ij Q_i.
// Three kernels, all one warp per row (the layout of the forward's baseline, so every K/V/Q row is read as
// whole 32-lane coalesced segments and dot products are warp shuffles):
//  - delta: one warp per query row;
//  - dQ: one warp per query row, looping over the keys it sees, dQ in registers;
//  - dK/dV: one warp per key row of a KV head, looping over the query rows that see it in every query head
//    of its GQA group, dK and dV in registers: the group's sum is formed in the kernel, without atomics and
//    without repeating K/V.
// No atomics anywhere, so the result is bit-reproducible (deterministic=True costs nothing here). No tensor
// cores and no shared-memory tiling: the readable baseline, for every dtype and D <= 256; the launcher takes
// flash_attention_bwd_mma.cu's tensor-core dQ and dK/dV where the tensor-core forward applies (fp16/bf16, D 64
// or 128, 16-byte aligned rows, sm_80+), after this file's delta kernel.
#include "attention_params.cuh"
#include "common.cuh"

namespace gpuforge {

constexpr int kAttnBwdWarpsPerBlock = 4;

// Loads D elements of `row` into the lane's registers (element d = lane + 32 i), times `factor`; 0 past D.
template <typename T, int kPerLane>
__device__ __forceinline__ void load_row(float (&reg)[kPerLane], const T* row, long long head_dim, int lane,
                                         float factor) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const long long d = lane + 32 * i;
    reg[i] = d < head_dim ? to_float(row[d]) * factor : 0.f;
  }
}

template <typename T, int kPerLane>
__device__ __forceinline__ float dot_row(const float (&reg)[kPerLane], const T* row, long long head_dim, int lane) {
  float partial = 0.f;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const long long d = lane + 32 * i;
    if (d < head_dim) partial += reg[i] * to_float(row[d]);
  }
  return warp_sum(partial);
}

// acc += factor * row
template <typename T, int kPerLane>
__device__ __forceinline__ void axpy_row(float (&acc)[kPerLane], float factor, const T* row, long long head_dim,
                                         int lane) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const long long d = lane + 32 * i;
    if (d < head_dim) acc[i] += factor * to_float(row[d]);
  }
}

template <typename T, int kPerLane>
__device__ __forceinline__ void store_row(T* row, const float (&reg)[kPerLane], float factor, long long head_dim,
                                          int lane) {
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const long long d = lane + 32 * i;
    if (d < head_dim) row[d] = from_float<T>(reg[i] * factor);
  }
}

// delta (B, Hq, Sq) = rowsum(dout * out) - dlse. Grid: (cdiv(Sq, 4), B * Hq).
template <typename T, int kPerLane>
__global__ void __launch_bounds__(kAttnBwdWarpsPerBlock * 32)
flash_attention_bwd_delta_kernel(const T* __restrict__ out,      // (B, Hq, Sq, D) contiguous
                                 const T* __restrict__ dout,     // (B, Hq, Sq, D) contiguous
                                 const float* __restrict__ dlse,  // (B, Hq, Sq)
                                 float* __restrict__ delta,       // (B, Hq, Sq)
                                 AttentionParams prm) {
  const int lane = threadIdx.x % 32;
  const long long row = static_cast<long long>(blockIdx.x) * kAttnBwdWarpsPerBlock + threadIdx.x / 32;
  if (row >= prm.seqlen_q) return;  // whole warps exit together: the shuffles stay full-warp
  const long long r = static_cast<long long>(blockIdx.y) * prm.seqlen_q + row;
  float o[kPerLane];
  load_row<T, kPerLane>(o, out + r * prm.head_dim, prm.head_dim, lane, 1.f);
  const float rowsum = dot_row<T, kPerLane>(o, dout + r * prm.head_dim, prm.head_dim, lane);
  if (lane == 0) delta[r] = rowsum - dlse[r];
}

// dQ (B, Hq, Sq, D contiguous): one warp per query row over the keys it sees. Grid: (cdiv(Sq, 4), B * Hq).
// The launch bounds' minimum of 1 block per SM lets ptxas use the registers it needs: with the maximum alone it
// aimed at 16 resident blocks (32 registers a thread) and spilled 8-48 B at D <= 64.
template <typename T, int kPerLane>
__global__ void __launch_bounds__(kAttnBwdWarpsPerBlock * 32, 1)
flash_attention_bwd_dq_kernel(const T* __restrict__ q,          // (B, Hq, Sq, D) strided
                              const T* __restrict__ k,          // (B, Hkv, Sk, D) strided
                              const T* __restrict__ v,          // (B, Hkv, Sk, D) strided
                              const T* __restrict__ dout,       // (B, Hq, Sq, D) contiguous
                              const float* __restrict__ lse,    // (B, Hq, Sq) natural log
                              const float* __restrict__ delta,  // (B, Hq, Sq)
                              T* __restrict__ dq,               // (B, Hq, Sq, D) contiguous
                              AttentionParams prm) {
  const int lane = threadIdx.x % 32;
  const long long row = static_cast<long long>(blockIdx.x) * kAttnBwdWarpsPerBlock + threadIdx.x / 32;
  if (row >= prm.seqlen_q) return;
  const long long bh = blockIdx.y;
  const long long b = bh / prm.heads_q, h = bh % prm.heads_q;
  const long long hk = h / (prm.heads_q / prm.heads_kv);
  const long long r = bh * prm.seqlen_q + row;
  const T* k_head = k + b * prm.k_b + hk * prm.k_h;
  const T* v_head = v + b * prm.v_b + hk * prm.v_h;

  float q_reg[kPerLane], do_reg[kPerLane], acc[kPerLane];
  load_row<T, kPerLane>(q_reg, q + b * prm.q_b + h * prm.q_h + row * prm.q_s, prm.head_dim, lane, prm.scale);
  load_row<T, kPerLane>(do_reg, dout + r * prm.head_dim, prm.head_dim, lane, 1.f);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) acc[i] = 0.f;
  const float row_lse = lse[r], row_delta = delta[r];
  long long lo, hi;
  visible_keys(prm, row, lo, hi);  // empty for a row that sees no key (its LSE is -inf): dQ = 0
  for (long long j = lo; j < hi; ++j) {
    const T* k_row = k_head + j * prm.k_s;
    const float p = __expf(dot_row<T, kPerLane>(q_reg, k_row, prm.head_dim, lane) - row_lse);
    const float ds = p * (dot_row<T, kPerLane>(do_reg, v_head + j * prm.v_s, prm.head_dim, lane) - row_delta);
    axpy_row<T, kPerLane>(acc, ds, k_row, prm.head_dim, lane);
  }
  store_row<T, kPerLane>(dq + r * prm.head_dim, acc, prm.scale, prm.head_dim, lane);
}

// dK, dV (B, Hkv, Sk, D contiguous): one warp per key row, summing over the query rows that see it in each of
// the Hq / Hkv query heads of its group. Grid: (cdiv(Sk, 4), B * Hkv).
template <typename T, int kPerLane>
__global__ void __launch_bounds__(kAttnBwdWarpsPerBlock * 32)
flash_attention_bwd_dkdv_kernel(const T* __restrict__ q,          // (B, Hq, Sq, D) strided
                                const T* __restrict__ k,          // (B, Hkv, Sk, D) strided
                                const T* __restrict__ v,          // (B, Hkv, Sk, D) strided
                                const T* __restrict__ dout,       // (B, Hq, Sq, D) contiguous
                                const float* __restrict__ lse,    // (B, Hq, Sq) natural log
                                const float* __restrict__ delta,  // (B, Hq, Sq)
                                T* __restrict__ dk,               // (B, Hkv, Sk, D) contiguous
                                T* __restrict__ dv,               // (B, Hkv, Sk, D) contiguous
                                AttentionParams prm) {
  const int lane = threadIdx.x % 32;
  const long long key = static_cast<long long>(blockIdx.x) * kAttnBwdWarpsPerBlock + threadIdx.x / 32;
  if (key >= prm.seqlen_k) return;
  const long long bhk = blockIdx.y;
  const long long b = bhk / prm.heads_kv, hk = bhk % prm.heads_kv;
  const long long group = prm.heads_q / prm.heads_kv;

  float k_reg[kPerLane], v_reg[kPerLane], dk_acc[kPerLane], dv_acc[kPerLane];
  load_row<T, kPerLane>(k_reg, k + b * prm.k_b + hk * prm.k_h + key * prm.k_s, prm.head_dim, lane, prm.scale);
  load_row<T, kPerLane>(v_reg, v + b * prm.v_b + hk * prm.v_h + key * prm.v_s, prm.head_dim, lane, 1.f);
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) dk_acc[i] = dv_acc[i] = 0.f;
  long long lo, hi;
  rows_seeing_key(prm, key, lo, hi);
  for (long long h = hk * group; h < (hk + 1) * group; ++h) {
    const T* q_head = q + b * prm.q_b + h * prm.q_h;
    const long long r0 = (b * prm.heads_q + h) * prm.seqlen_q;
    for (long long i = lo; i < hi; ++i) {
      const T* q_row = q_head + i * prm.q_s;
      const T* do_row = dout + (r0 + i) * prm.head_dim;
      const float p = __expf(dot_row<T, kPerLane>(k_reg, q_row, prm.head_dim, lane) - lse[r0 + i]);
      const float ds = p * (dot_row<T, kPerLane>(v_reg, do_row, prm.head_dim, lane) - delta[r0 + i]);
      axpy_row<T, kPerLane>(dv_acc, p, do_row, prm.head_dim, lane);
      axpy_row<T, kPerLane>(dk_acc, ds, q_row, prm.head_dim, lane);
    }
  }
  const long long r = bhk * prm.seqlen_k + key;
  store_row<T, kPerLane>(dk + r * prm.head_dim, dk_acc, prm.scale, prm.head_dim, lane);
  store_row<T, kPerLane>(dv + r * prm.head_dim, dv_acc, 1.f, prm.head_dim, lane);
}

}  // namespace gpuforge

#ifndef __CUDACC_RTC__
#include <type_traits>

#include "launchers.h"

namespace gpuforge {

namespace {

// delta, then dQ and dK/dV on the row-per-warp kernels, or (tensor_cores) on flash_attention_bwd_mma.cu's.
template <typename T, int kPerLane>
cudaError_t launch_backward(const void* q, const void* k, const void* v, const void* out, const void* dout,
                            const float* lse, const float* dlse, void* dq, void* dk, void* dv, float* delta,
                            int64_t batch, const AttentionParams& prm, const int64_t* q_strides,
                            const int64_t* k_strides, const int64_t* v_strides, bool tensor_cores, DType dtype,
                            cudaStream_t stream) {
  constexpr int kThreads = kAttnBwdWarpsPerBlock * 32;
  auto rows = [](long long n) {
    return static_cast<unsigned>((n + kAttnBwdWarpsPerBlock - 1) / kAttnBwdWarpsPerBlock);
  };
  const auto* qt = static_cast<const T*>(q);
  const auto* kt = static_cast<const T*>(k);
  const auto* vt = static_cast<const T*>(v);
  const auto* dot = static_cast<const T*>(dout);
  const unsigned bhq = static_cast<unsigned>(batch * prm.heads_q);
  if (prm.seqlen_q > 0) {
    flash_attention_bwd_delta_kernel<T, kPerLane><<<dim3(rows(prm.seqlen_q), bhq), kThreads, 0, stream>>>(
        static_cast<const T*>(out), dot, dlse, delta, prm);
    GF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (tensor_cores)
    return launch_flash_attention_backward_mma(q, k, v, dout, lse, delta, dq, dk, dv, batch, prm.heads_q,
                                               prm.heads_kv, prm.seqlen_q, prm.seqlen_k, prm.head_dim,
                                               prm.window_left, prm.window_right, q_strides, k_strides, v_strides,
                                               prm.scale, dtype, stream);
  if (prm.seqlen_q > 0) {
    flash_attention_bwd_dq_kernel<T, kPerLane><<<dim3(rows(prm.seqlen_q), bhq), kThreads, 0, stream>>>(
        qt, kt, vt, dot, lse, delta, static_cast<T*>(dq), prm);
    GF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (prm.seqlen_k > 0) {
    const dim3 grid(rows(prm.seqlen_k), static_cast<unsigned>(batch * prm.heads_kv));
    flash_attention_bwd_dkdv_kernel<T, kPerLane><<<grid, kThreads, 0, stream>>>(
        qt, kt, vt, dot, lse, delta, static_cast<T*>(dk), static_cast<T*>(dv), prm);
    GF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_flash_attention_backward(const void* q, const void* k, const void* v, const void* out,
                                            const void* dout, const float* lse, const float* dlse, void* dq,
                                            void* dk, void* dv, float* delta, int64_t batch, int64_t heads_q,
                                            int64_t heads_kv, int64_t seqlen_q, int64_t seqlen_k, int64_t head_dim,
                                            int64_t window_left, int64_t window_right, const int64_t* q_strides,
                                            const int64_t* k_strides, const int64_t* v_strides, float scale,
                                            DType dtype, cudaStream_t stream) {
  if (batch * heads_q == 0) return cudaSuccess;
  if (head_dim < 1 || head_dim > 256 || heads_kv < 1 || heads_q % heads_kv) return cudaErrorInvalidValue;
  const AttentionParams prm = attention_params(heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left,
                                                window_right, q_strides, k_strides, v_strides, scale);
  const bool tensor_cores = dtype != DType::Float32 &&
                            attention_mma_applies(q, k, v, head_dim, q_strides, k_strides, v_strides);
  cudaGetLastError();  // a failed device probe above must not be reported as this launch's error
  return GF_DISPATCH_FLOAT_TYPES(dtype, [&]() -> cudaError_t {
    auto run = [&](auto per_lane) {
      return launch_backward<scalar_t, decltype(per_lane)::value>(q, k, v, out, dout, lse, dlse, dq, dk, dv,
                                                                  delta, batch, prm, q_strides, k_strides,
                                                                  v_strides, tensor_cores, dtype, stream);
    };
    // the per-lane register arrays are sized at compile time: D <= 32, 64, 128, 256
    if (head_dim <= 32) return run(std::integral_constant<int, 1>{});
    if (head_dim <= 64) return run(std::integral_constant<int, 2>{});
    if (head_dim <= 128) return run(std::integral_constant<int, 4>{});
    return run(std::integral_constant<int, 8>{});
  });
}

}  // namespace gpuforge
#endif  // __CUDACC_RTC__
