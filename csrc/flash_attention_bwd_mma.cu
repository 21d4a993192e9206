// Attention backward on tensor cores (mma.sync.m16n8k16, fp16/bf16, head dim 64 or 128, sm_80+): the
// recomputation of flash_attention_bwd.cu (P_ij = exp(scale q_i.k_j - lse_i), delta_i from its delta kernel)
// as two kernels, neither with atomics, so the result stays bit-reproducible:
//  - dK/dV: a block of 4 warps owns 64 keys of one KV head (16 per warp) with K and V in shared memory, and
//    streams 32-row tiles of Q and dO, for every query head of the GQA group, through a 2-stage cp.async ring.
//    Per tile, each warp computes Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (16 keys x 32 rows), Pᵀ and dSᵀ = Pᵀ (dPᵀ - delta)
//    in registers, and accumulates dV += Pᵀ dO and dK += dSᵀ Q with Pᵀ and dSᵀ re-packed as A fragments (the
//    C layout of two n8 tiles is the A layout of one k16 step), so nothing S x S touches shared memory.
//  - dQ: a block owns 64 query rows (Q and dO in shared memory) and streams 32-key tiles of K and V; each warp
//    computes S = Q Kᵀ and dP = dO Vᵀ, then dQ += dS K.
// What stays in SRAM: the block's own tiles (2 x 64 x D) and 2 stages of the streamed pair (2 x 2 x 32 x D);
// the fp32 accumulators (dK and dV, or dQ) and the 16x32 score fragments live in registers. Every element is
// masked by the window, Sq and Sk (a row that sees no key has LSE -inf and gets P = 0).
#include "attention_params.cuh"
#include "common.cuh"
#include "mma.cuh"

namespace gpuforge {

constexpr int kBwdOwnRows = 64;     // keys (dK/dV) or query rows (dQ) a block owns: 4 warps x 16
constexpr int kBwdStreamRows = 32;  // rows of the streamed tiles
constexpr int kBwdThreads = 128;
constexpr int kBwdStages = 2;

// Bytes of dynamic shared memory: the two owned tiles and the stages of the two streamed ones.
template <int kHeadDim, typename T>
__host__ __device__ constexpr int bwd_mma_shared_bytes() {
  return (2 * kBwdOwnRows + 2 * kBwdStages * kBwdStreamRows) * kHeadDim * static_cast<int>(sizeof(T));
}

// acc (16 x 32, four n8 tiles) = a_tile's 16 rows (from row a_row0) x b_tile's 32 rows, transposed: the dot products
// over D of rows of two swizzled tiles (A rows = m, B rows = n, both with D along the chunks).
template <typename T, int kHeadDim>
__device__ __forceinline__ void rows_times_rows(float (&acc)[4][4], const T* a_tile, int a_row0, const T* b_tile,
                                                int lane) {
  const LdmatrixLane a_lane = ldmatrix_rows_first(lane), b_lane = ldmatrix_chunks_first(lane);
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
    unsigned af[4];
    ldmatrix_x4(af, a_tile + swizzled_offset<kHeadDim>(a_row0 + a_lane.row, kk * 2 + a_lane.chunk));
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      unsigned bf[4];
      ldmatrix_x4(bf, b_tile + swizzled_offset<kHeadDim>(p * 16 + b_lane.row, kk * 2 + b_lane.chunk));
      mma_16x8x16<T>(acc[2 * p], af, bf[0], bf[1]);
      mma_16x8x16<T>(acc[2 * p + 1], af, bf[2], bf[3]);
    }
  }
}

// out (16 x D) += x (16 x 32, four n8 tiles of fp32, rounded to T) x b_tile (32 rows x D): b's rows are the
// reduction, so its fragments are loaded transposed.
template <typename T, int kHeadDim>
__device__ __forceinline__ void accumulate_times_rows(float (&out)[kHeadDim / 8][4], const float (&x)[4][4],
                                                      const T* b_tile, int lane) {
  const LdmatrixLane b_lane = ldmatrix_rows_first(lane);
#pragma unroll
  for (int kk = 0; kk < 2; ++kk) {
    const unsigned xf[4] = {pack_pair<T>(x[2 * kk][0], x[2 * kk][1]), pack_pair<T>(x[2 * kk][2], x[2 * kk][3]),
                            pack_pair<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]),
                            pack_pair<T>(x[2 * kk + 1][2], x[2 * kk + 1][3])};
#pragma unroll
    for (int p = 0; p < kHeadDim / 16; ++p) {
      unsigned bf[4];
      ldmatrix_x4_trans(bf, b_tile + swizzled_offset<kHeadDim>(kk * 16 + b_lane.row, p * 2 + b_lane.chunk));
      mma_16x8x16<T>(out[2 * p], xf, bf[0], bf[1]);
      mma_16x8x16<T>(out[2 * p + 1], xf, bf[2], bf[3]);
    }
  }
}

__device__ __forceinline__ bool sees(const AttentionParams& prm, long long row, long long key) {
  const long long diag = row + prm.seqlen_k - prm.seqlen_q;
  return row < prm.seqlen_q && key < prm.seqlen_k && (prm.window_left < 0 || key >= diag - prm.window_left) &&
         (prm.window_right < 0 || key <= diag + prm.window_right);
}

// Rows (16 x D fp32 fragments, rows g and g + 8 of the warp's 16) times `factor`, rounded, to a contiguous
// (rows, D) matrix from row `row0`; rows at or past `rows` are not written.
template <typename T, int kHeadDim>
__device__ __forceinline__ void store_rows(T* out, const float (&acc)[kHeadDim / 8][4], long long row0, long long rows,
                                           float factor, int lane) {
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long row = row0 + g + 8 * r;
    if (row >= rows) continue;
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j)
      store_pair(out + row * kHeadDim + j * 8 + 2 * t, acc[j][2 * r] * factor, acc[j][2 * r + 1] * factor);
  }
}

// Grid: (cdiv(Sk, 64), B * Hkv). Preconditions (the launcher's): D == kHeadDim; q, k, v strides over (batch,
// head, row) multiples of 8 and 16-byte aligned pointers; dout contiguous like the forward's output.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kBwdThreads)
flash_attention_bwd_dkdv_mma_kernel(const T* __restrict__ q,          // (B, Hq, Sq, D) strided
                                    const T* __restrict__ k,          // (B, Hkv, Sk, D) strided
                                    const T* __restrict__ v,          // (B, Hkv, Sk, D) strided
                                    const T* __restrict__ dout,       // (B, Hq, Sq, D) contiguous
                                    const float* __restrict__ lse,    // (B, Hq, Sq) natural log
                                    const float* __restrict__ delta,  // (B, Hq, Sq)
                                    T* __restrict__ dk,               // (B, Hkv, Sk, D) contiguous
                                    T* __restrict__ dv,               // (B, Hkv, Sk, D) contiguous
                                    AttentionParams prm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kOwn = kBwdOwnRows * kHeadDim, kStream = kBwdStreamRows * kHeadDim;
  GF_DYNAMIC_SHARED(unsigned char, bwd_smem_raw);
  T* const k_tile = reinterpret_cast<T*>(bwd_smem_raw);
  T* const v_tile = k_tile + kOwn;
  T* const q_stages = v_tile + kOwn;                  // [stage][kStream]
  T* const do_stages = q_stages + kBwdStages * kStream;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const long long n0 = static_cast<long long>(blockIdx.x) * kBwdOwnRows;
  const long long bhk = blockIdx.y, b = bhk / prm.heads_kv, hk = bhk % prm.heads_kv;
  const long long group = prm.heads_q / prm.heads_kv;
  cp_async_tile<kBwdOwnRows, kHeadDim, kBwdThreads>(k_tile, k + b * prm.k_b + hk * prm.k_h, prm.k_s, n0,
                                                    prm.seqlen_k);
  cp_async_tile<kBwdOwnRows, kHeadDim, kBwdThreads>(v_tile, v + b * prm.v_b + hk * prm.v_h, prm.v_s, n0,
                                                    prm.seqlen_k);

  // The query rows any of the block's keys is seen by (the rule is monotone in the key), in whole tiles, for
  // each query head of the group: steps = group x tiles.
  long long lo, hi, lo_last, hi_last;
  rows_seeing_key(prm, n0, lo, hi);
  rows_seeing_key(prm, min(n0 + kBwdOwnRows, prm.seqlen_k) - 1, lo_last, hi_last);
  const long long tile_lo = lo / kBwdStreamRows;
  const long long tiles = hi_last > lo ? (hi_last + kBwdStreamRows - 1) / kBwdStreamRows - tile_lo : 0;
  const long long steps = group * tiles;
  const auto load_step = [&](int stage, long long step) {
    const long long h = hk * group + step / tiles, m0 = (tile_lo + step % tiles) * kBwdStreamRows;
    cp_async_tile<kBwdStreamRows, kHeadDim, kBwdThreads>(q_stages + stage * kStream, q + b * prm.q_b + h * prm.q_h,
                                                         prm.q_s, m0, prm.seqlen_q);
    cp_async_tile<kBwdStreamRows, kHeadDim, kBwdThreads>(
        do_stages + stage * kStream, dout + (b * prm.heads_q + h) * prm.seqlen_q * kHeadDim, kHeadDim, m0,
        prm.seqlen_q);
  };
  if (steps > 0) load_step(0, 0);
  cp_async_commit();

  float dk_acc[kHeadDim / 8][4] = {}, dv_acc[kHeadDim / 8][4] = {};
  const float scale_log2 = prm.scale * 1.4426950408889634f;
  for (long long step = 0; step < steps; ++step) {
    cp_async_wait<0>();  // this step's tiles (and, on the first, K and V) have landed for this thread ...
    __syncthreads();     // ... for every thread, and every warp is done with the other stage
    const int stage = static_cast<int>(step % kBwdStages);
    if (step + 1 < steps) load_step(stage ^ 1, step + 1);
    cp_async_commit();
    const T* const qs = q_stages + stage * kStream;
    const T* const dos = do_stages + stage * kStream;
    const long long h = hk * group + step / tiles, m0 = (tile_lo + step % tiles) * kBwdStreamRows;
    const long long r0 = (b * prm.heads_q + h) * prm.seqlen_q;

    float p[4][4], ds[4][4];  // Pᵀ and dSᵀ: rows = the warp's keys, columns = the tile's query rows
    rows_times_rows<T, kHeadDim>(p, k_tile, 16 * warp, qs, lane);
    rows_times_rows<T, kHeadDim>(ds, v_tile, 16 * warp, dos, lane);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const long long row = m0 + 8 * j + 2 * t + e % 2, key = n0 + 16 * warp + g + 8 * (e / 2);
        const bool visible = sees(prm, row, key);
        const float pe = visible ? exp2f(p[j][e] * scale_log2 - lse[r0 + row] * 1.4426950408889634f) : 0.f;
        p[j][e] = pe;
        ds[j][e] = visible ? pe * (ds[j][e] - delta[r0 + row]) : 0.f;
      }
    accumulate_times_rows<T, kHeadDim>(dv_acc, p, dos, lane);
    accumulate_times_rows<T, kHeadDim>(dk_acc, ds, qs, lane);
  }
  cp_async_wait<0>();
  const long long key0 = bhk * prm.seqlen_k, warp_key = n0 + 16 * warp;
  store_rows<T, kHeadDim>(dk + key0 * kHeadDim, dk_acc, warp_key, prm.seqlen_k, prm.scale, lane);
  store_rows<T, kHeadDim>(dv + key0 * kHeadDim, dv_acc, warp_key, prm.seqlen_k, 1.f, lane);
#endif
}

// Grid: (cdiv(Sq, 64), B * Hq); the preconditions of the dK/dV kernel.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kBwdThreads)
flash_attention_bwd_dq_mma_kernel(const T* __restrict__ q,          // (B, Hq, Sq, D) strided
                                  const T* __restrict__ k,          // (B, Hkv, Sk, D) strided
                                  const T* __restrict__ v,          // (B, Hkv, Sk, D) strided
                                  const T* __restrict__ dout,       // (B, Hq, Sq, D) contiguous
                                  const float* __restrict__ lse,    // (B, Hq, Sq) natural log
                                  const float* __restrict__ delta,  // (B, Hq, Sq)
                                  T* __restrict__ dq,               // (B, Hq, Sq, D) contiguous
                                  AttentionParams prm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kOwn = kBwdOwnRows * kHeadDim, kStream = kBwdStreamRows * kHeadDim;
  GF_DYNAMIC_SHARED(unsigned char, bwd_smem_raw);
  T* const q_tile = reinterpret_cast<T*>(bwd_smem_raw);
  T* const do_tile = q_tile + kOwn;
  T* const k_stages = do_tile + kOwn;  // [stage][kStream]
  T* const v_stages = k_stages + kBwdStages * kStream;

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
  const long long m0 = static_cast<long long>(blockIdx.x) * kBwdOwnRows;
  const long long bh = blockIdx.y, b = bh / prm.heads_q, h = bh % prm.heads_q;
  const long long hk = h / (prm.heads_q / prm.heads_kv);
  const long long r0 = bh * prm.seqlen_q;
  const T* const k_head = k + b * prm.k_b + hk * prm.k_h;
  const T* const v_head = v + b * prm.v_b + hk * prm.v_h;
  cp_async_tile<kBwdOwnRows, kHeadDim, kBwdThreads>(q_tile, q + b * prm.q_b + h * prm.q_h, prm.q_s, m0,
                                                    prm.seqlen_q);
  cp_async_tile<kBwdOwnRows, kHeadDim, kBwdThreads>(do_tile, dout + r0 * kHeadDim, kHeadDim, m0, prm.seqlen_q);

  // The keys any row of the block sees, in whole tiles.
  long long lo, hi, lo_last, hi_last;
  visible_keys(prm, m0, lo, hi);
  visible_keys(prm, min(m0 + kBwdOwnRows, prm.seqlen_q) - 1, lo_last, hi_last);
  const long long tile_lo = lo / kBwdStreamRows;
  const long long tiles = hi_last > lo ? (hi_last + kBwdStreamRows - 1) / kBwdStreamRows - tile_lo : 0;
  const auto load_tile = [&](int stage, long long tile) {
    const long long n0 = (tile_lo + tile) * kBwdStreamRows;
    cp_async_tile<kBwdStreamRows, kHeadDim, kBwdThreads>(k_stages + stage * kStream, k_head, prm.k_s, n0,
                                                         prm.seqlen_k);
    cp_async_tile<kBwdStreamRows, kHeadDim, kBwdThreads>(v_stages + stage * kStream, v_head, prm.v_s, n0,
                                                         prm.seqlen_k);
  };
  if (tiles > 0) load_tile(0, 0);
  cp_async_commit();

  // This thread's rows (g and g + 8 of the warp's 16): LSE in log2 units and delta; rows past Sq see nothing.
  float lse_log2[2], row_delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long row = m0 + 16 * warp + g + 8 * r;
    lse_log2[r] = row < prm.seqlen_q ? lse[r0 + row] * 1.4426950408889634f : 0.f;
    row_delta[r] = row < prm.seqlen_q ? delta[r0 + row] : 0.f;
  }
  float dq_acc[kHeadDim / 8][4] = {};
  const float scale_log2 = prm.scale * 1.4426950408889634f;
  for (long long tile = 0; tile < tiles; ++tile) {
    cp_async_wait<0>();
    __syncthreads();
    const int stage = static_cast<int>(tile % kBwdStages);
    if (tile + 1 < tiles) load_tile(stage ^ 1, tile + 1);
    cp_async_commit();
    const T* const ks = k_stages + stage * kStream;
    const T* const vs = v_stages + stage * kStream;
    const long long n0 = (tile_lo + tile) * kBwdStreamRows;

    float ds[4][4], dp[4][4];  // S, then dS; dP: rows = the warp's query rows, columns = the tile's keys
    rows_times_rows<T, kHeadDim>(ds, q_tile, 16 * warp, ks, lane);
    rows_times_rows<T, kHeadDim>(dp, do_tile, 16 * warp, vs, lane);
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const long long row = m0 + 16 * warp + g + 8 * (e / 2), key = n0 + 8 * j + 2 * t + e % 2;
        const float pe = sees(prm, row, key) ? exp2f(ds[j][e] * scale_log2 - lse_log2[e / 2]) : 0.f;
        ds[j][e] = pe * (dp[j][e] - row_delta[e / 2]);
      }
    accumulate_times_rows<T, kHeadDim>(dq_acc, ds, ks, lane);
  }
  cp_async_wait<0>();
  store_rows<T, kHeadDim>(dq + r0 * kHeadDim, dq_acc, m0 + 16 * warp, prm.seqlen_q, prm.scale, lane);
#endif
}

}  // namespace gpuforge

#ifndef __CUDACC_RTC__
#include <type_traits>

#include "launchers.h"

namespace gpuforge {

namespace {

template <typename T, int kHeadDim>
cudaError_t launch_bwd_mma(const void* q, const void* k, const void* v, const void* dout, const float* lse,
                           const float* delta, void* dq, void* dk, void* dv, int64_t batch, const AttentionParams& prm,
                           cudaStream_t stream) {
  constexpr int kSmemBytes = bwd_mma_shared_bytes<kHeadDim, T>();
  const auto* qt = static_cast<const T*>(q);
  const auto* kt = static_cast<const T*>(k);
  const auto* vt = static_cast<const T*>(v);
  const auto* dot = static_cast<const T*>(dout);
  const auto blocks = [](long long n) { return static_cast<unsigned>((n + kBwdOwnRows - 1) / kBwdOwnRows); };
  if (prm.seqlen_q > 0) {
    auto kernel = flash_attention_bwd_dq_mma_kernel<T, kHeadDim>;
    GF_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    kernel<<<dim3(blocks(prm.seqlen_q), static_cast<unsigned>(batch * prm.heads_q)), kBwdThreads, kSmemBytes,
             stream>>>(qt, kt, vt, dot, lse, delta, static_cast<T*>(dq), prm);
    GF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  if (prm.seqlen_k > 0) {
    auto kernel = flash_attention_bwd_dkdv_mma_kernel<T, kHeadDim>;
    GF_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
    kernel<<<dim3(blocks(prm.seqlen_k), static_cast<unsigned>(batch * prm.heads_kv)), kBwdThreads, kSmemBytes,
             stream>>>(qt, kt, vt, dot, lse, delta, static_cast<T*>(dk), static_cast<T*>(dv), prm);
    GF_CUDA_RETURN_IF_ERROR(cudaGetLastError());
  }
  return cudaSuccess;
}

}  // namespace

cudaError_t launch_flash_attention_backward_mma(const void* q, const void* k, const void* v, const void* dout,
                                                const float* lse, const float* delta, void* dq, void* dk, void* dv,
                                                int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
                                                int64_t seqlen_k, int64_t head_dim, int64_t window_left,
                                                int64_t window_right, const int64_t* q_strides,
                                                const int64_t* k_strides, const int64_t* v_strides, float scale,
                                                DType dtype, cudaStream_t stream) {
  const AttentionParams prm = attention_params(heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left,
                                                window_right, q_strides, k_strides, v_strides, scale);
  const auto run = [&](auto t, auto d) {
    return launch_bwd_mma<decltype(t), decltype(d)::value>(q, k, v, dout, lse, delta, dq, dk, dv, batch, prm,
                                                           stream);
  };
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (dtype == DType::Float32 || (head_dim != 64 && head_dim != 128)) return cudaErrorNotSupported;
  if (dtype == DType::BFloat16) return head_dim == 64 ? run(__nv_bfloat16{}, D64{}) : run(__nv_bfloat16{}, D128{});
  return head_dim == 64 ? run(__half{}, D64{}) : run(__half{}, D128{});
}

}  // namespace gpuforge
#endif  // __CUDACC_RTC__
