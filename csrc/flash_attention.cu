// Attention forward (bottom-right aligned window; causal is window_right = 0; GQA by head index mapping), two
// kernels; the launcher takes the tensor-core one where it applies:
//  - flash_attention_fwd_mma_kernel: FlashAttention-2 on tensor cores (mma.sync.m16n8k16) for fp16/bf16,
//    head dim 64 or 128, 16-byte aligned rows, sm_80+ (described at the kernel).
//  - flash_attention_fwd_rowwise_kernel: the readable baseline for every dtype and D <= 256: one warp per
//    query row, online softmax over the keys the row may see.
//
// Baseline: each lane holds D/32 elements of the (pre-scaled) query row and of the fp32 output accumulator in
// registers; a key's score is a warp-wide reduction with shuffles, so K and V rows are read as whole 32-lane coalesced
// segments. Rows of one block are consecutive queries of the same (batch, head), so the K/V rows they share
// are served by L1/L2. No tensor cores and no shared-memory tiling: the correctness baseline, not the fast path.
#include "attention_params.cuh"
#include "common.cuh"
#include "mma.cuh"

namespace gpuforge {

constexpr int kAttentionWarpsPerBlock = 4;

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
  long long lo, hi;
  visible_keys(prm, row, lo, hi);

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
    const float s = warp_sum(partial);
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

// ---------------------------------------------------------------------------------------------------------
// Fast path: FlashAttention-2 forward on tensor cores (fp16/bf16, sm_80+, head dim 64 or 128).
//
// One block of 4 warps per (64-row query tile, batch x head); each warp owns 16 query rows. The warp's Q
// fragments (16 x D) stay in registers for the whole key loop. 64-key tiles of K and V stream through a
// 2-stage cp.async pipeline in shared memory (tile j+1 is in flight while the tensor cores work on tile j).
// S = Q Kᵀ and O += P V are mma.sync.m16n8k16; the S accumulators are re-packed in registers as the A
// operand of P V (the C layout of two n8 tiles is the A layout of one k16 step), so P never touches shared
// memory. Softmax statistics (running max m and sum l, log2 domain) live in fp32 registers: each thread
// holds two rows (g and g + 8) and a quad of 4 lanes shares a row, so row reductions are two shuffles.
// Key tiles outside the window (causal: right of the diagonal) are never loaded; only tiles that cross the
// diagonal, the window's left edge or Sk are masked element-wise.
constexpr int kFaBlockM = 64;   // query rows per block: 4 warps x 16
constexpr int kFaBlockN = 64;   // keys per pipeline stage
constexpr int kFaThreads = 128;
constexpr int kFaStages = 2;

// Preconditions (checked by the launcher): D == kHeadDim; the strides over (batch, head, row) of q, k, v are
// multiples of 8 elements and the pointers 16-byte aligned. Grid: (cdiv(Sq, 64), B * Hq); dynamic shared
// memory 2 stages x (K + V) x 64 x D elements.
template <typename T, int kHeadDim>
__global__ void __launch_bounds__(kFaThreads)
flash_attention_fwd_mma_kernel(const T* __restrict__ q,  // (B, Hq, Sq, D) strided, D contiguous
                               const T* __restrict__ k,  // (B, Hkv, Sk, D) strided, D contiguous
                               const T* __restrict__ v,  // (B, Hkv, Sk, D) strided, D contiguous
                               T* __restrict__ out,      // (B, Hq, Sq, D) contiguous
                               float* __restrict__ lse,  // (B, Hq, Sq) natural log
                               AttentionParams prm) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int kTileElems = kFaBlockN * kHeadDim;
  GF_DYNAMIC_SHARED(unsigned char, fa_smem_raw);
  T* k_smem = reinterpret_cast<T*>(fa_smem_raw);  // [stage][kTileElems]
  T* v_smem = k_smem + kFaStages * kTileElems;

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const int g = lane / 4, t = lane % 4;
  // Heaviest query tiles (the last ones under a causal mask) are scheduled first.
  const long long m0 = static_cast<long long>(gridDim.x - 1 - blockIdx.x) * kFaBlockM;
  const long long bh = blockIdx.y;
  const long long b = bh / prm.heads_q, h = bh % prm.heads_q;
  const long long hk = h / (prm.heads_q / prm.heads_kv);
  const T* q_head = q + b * prm.q_b + h * prm.q_h;
  const T* k_head = k + b * prm.k_b + hk * prm.k_h;
  const T* v_head = v + b * prm.v_b + hk * prm.v_h;

  // Key range seen by any row of this tile (bottom-right aligned window), then whole 64-key tiles over it.
  const long long shift = prm.seqlen_k - prm.seqlen_q;
  const long long last_row = min(m0 + kFaBlockM, prm.seqlen_q) - 1;
  const long long key_lo = prm.window_left < 0 ? 0 : max(0LL, m0 + shift - prm.window_left);
  const long long key_hi =
      prm.window_right < 0 ? prm.seqlen_k : min(prm.seqlen_k, last_row + shift + prm.window_right + 1);
  const long long tile_lo = key_lo / kFaBlockN;
  const long long tile_hi = key_hi > key_lo ? (key_hi + kFaBlockN - 1) / kFaBlockN : tile_lo;

  auto load_tile = [&](int stage, long long n0) {  // keys past Sk are zero-filled
    cp_async_tile<kFaBlockN, kHeadDim, kFaThreads>(k_smem + stage * kTileElems, k_head, prm.k_s, n0, prm.seqlen_k);
    cp_async_tile<kFaBlockN, kHeadDim, kFaThreads>(v_smem + stage * kTileElems, v_head, prm.v_s, n0, prm.seqlen_k);
  };
  if (tile_lo < tile_hi) load_tile(0, tile_lo * kFaBlockN);
  cp_async_commit();

  // Q fragments straight from global memory (read once per block): A layout of each k16 step over D.
  const long long row_a = m0 + warp * 16 + g, row_b = row_a + 8;
  unsigned q_frag[kHeadDim / 16][4];
#pragma unroll
  for (int kk = 0; kk < kHeadDim / 16; ++kk) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const long long row = (r % 2) ? row_b : row_a;
      const int col = kk * 16 + 2 * t + 8 * (r / 2);
      q_frag[kk][r] = row < prm.seqlen_q
                          ? *reinterpret_cast<const unsigned*>(q_head + row * prm.q_s + col) : 0u;
    }
  }

  float o[kHeadDim / 8][4] = {};
  const float neg_inf = -__int_as_float(0x7f800000);  // -inf (NVRTC has no INFINITY macro)
  float m_run[2] = {neg_inf, neg_inf};  // rows g, g + 8; scores in log2 units
  float l_run[2] = {0.f, 0.f};              // this thread's partial row sums (quad-reduced at the end)
  const float scale_log2 = prm.scale * 1.4426950408889634f;  // exp(x) = 2^(x log2 e)
  // ldmatrix lane addresses: K is the B operand with keys = n (chunks first: b0, b1 of n8 tile 0, then of tile
  // 1), V the transposed B operand with keys = k (rows first: b0, b1 of dim tile 0, then of dim tile 1).
  const LdmatrixLane k_lane = ldmatrix_chunks_first(lane), v_lane = ldmatrix_rows_first(lane);

  for (long long tile = tile_lo; tile < tile_hi; ++tile) {
    cp_async_wait<0>();  // this tile has landed (for this thread) ...
    __syncthreads();     // ... for every thread, and every warp is done with the other stage
    const int stage = static_cast<int>((tile - tile_lo) % kFaStages);
    if (tile + 1 < tile_hi) load_tile(stage ^ 1, (tile + 1) * kFaBlockN);
    cp_async_commit();
    const T* ks = k_smem + stage * kTileElems;
    const T* vs = v_smem + stage * kTileElems;
    const long long n0 = tile * kFaBlockN;

    float s[kFaBlockN / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kHeadDim / 16; ++kk) {
#pragma unroll
      for (int p = 0; p < kFaBlockN / 16; ++p) {
        unsigned kf[4];
        ldmatrix_x4(kf, ks + swizzled_offset<kHeadDim>(p * 16 + k_lane.row, kk * 2 + k_lane.chunk));
        mma_16x8x16<T>(s[2 * p], q_frag[kk], kf[0], kf[1]);
        mma_16x8x16<T>(s[2 * p + 1], q_frag[kk], kf[2], kf[3]);
      }
    }

    // Element-wise mask only on tiles crossing Sk or a window edge (uniform per block: no divergence).
    const bool masked = n0 + kFaBlockN > prm.seqlen_k ||
                        (prm.window_right >= 0 && n0 + kFaBlockN - 1 > m0 + shift + prm.window_right) ||
                        (prm.window_left >= 0 && n0 < last_row + shift - prm.window_left);
#pragma unroll
    for (int j = 0; j < kFaBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * scale_log2;
        if (masked) {
          const long long key = n0 + j * 8 + 2 * t + (e % 2);
          const long long diag = ((e / 2) ? row_b : row_a) + shift;
          const bool visible = key < prm.seqlen_k &&
                               (prm.window_left < 0 || key >= diag - prm.window_left) &&
                               (prm.window_right < 0 || key <= diag + prm.window_right);
          x = visible ? x : neg_inf;
        }
        s[j][e] = x;
      }
    }

    // Online softmax: new running max, rescale of l and O, probabilities P = 2^(s - m).
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_run[r];
#pragma unroll
      for (int j = 0; j < kFaBlockN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      mx = quad_max(mx);
      const float base = mx == neg_inf ? 0.f : mx;  // a row with no visible key yet: P = 0, no NaN
      alpha[r] = exp2f(m_run[r] - base);             // m_run = -inf on the first tile: alpha = 0
      m_run[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < kFaBlockN / 8; ++j) {
        s[j][2 * r] = exp2f(s[j][2 * r] - base);
        s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - base);
        sum += s[j][2 * r] + s[j][2 * r + 1];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;
    }
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j) {
      o[j][0] *= alpha[0]; o[j][1] *= alpha[0];
      o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
    }

    // O += P V: the C fragments of key tiles 2kk and 2kk + 1 are the A fragment of key step kk.
#pragma unroll
    for (int kk = 0; kk < kFaBlockN / 16; ++kk) {
      const unsigned pf[4] = {pack_pair<T>(s[2 * kk][0], s[2 * kk][1]), pack_pair<T>(s[2 * kk][2], s[2 * kk][3]),
                              pack_pair<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                              pack_pair<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int p = 0; p < kHeadDim / 16; ++p) {
        unsigned vf[4];
        ldmatrix_x4_trans(vf, vs + swizzled_offset<kHeadDim>(kk * 16 + v_lane.row, p * 2 + v_lane.chunk));
        mma_16x8x16<T>(o[2 * p], pf, vf[0], vf[1]);
        mma_16x8x16<T>(o[2 * p + 1], pf, vf[2], vf[3]);
      }
    }
  }
  cp_async_wait<0>();

  // Normalise and store; a row that sees no key gets zeros and LSE -inf (as the baseline).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long row = r ? row_b : row_a;
    const float l = quad_sum(l_run[r]);
    if (row >= prm.seqlen_q) continue;
    const float inv_l = l > 0.f ? 1.f / l : 0.f;
    T* out_row = out + (bh * prm.seqlen_q + row) * kHeadDim;
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j)
      store_pair(out_row + j * 8 + 2 * t, o[j][2 * r] * inv_l, o[j][2 * r + 1] * inv_l);
    if (t == 0)
      lse[bh * prm.seqlen_q + row] = l > 0.f ? m_run[r] * 0.6931471805599453f + logf(l) : neg_inf;
  }
#endif
}

#ifndef __CUDACC_RTC__
}  // namespace gpuforge

#include <type_traits>

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

template <typename T, int kHeadDim>
cudaError_t launch_mma(const void* q, const void* k, const void* v, void* out, float* lse, int64_t batch,
                       const AttentionParams& prm, cudaStream_t stream) {
  constexpr int kSmemBytes = 2 * kFaStages * kFaBlockN * kHeadDim * static_cast<int>(sizeof(T));
  auto kernel = flash_attention_fwd_mma_kernel<T, kHeadDim>;
  GF_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes));
  const dim3 grid(static_cast<unsigned>((prm.seqlen_q + kFaBlockM - 1) / kFaBlockM),
                  static_cast<unsigned>(batch * prm.heads_q));
  kernel<<<grid, kFaThreads, kSmemBytes, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                                    static_cast<const T*>(v), static_cast<T*>(out), lse, prm);
  return cudaGetLastError();
}

}  // namespace

// The tensor-core kernel's preconditions: D 64 or 128, rows 16-byte aligned (cp.async), sm_80+.
bool attention_mma_applies(const void* q, const void* k, const void* v, int64_t head_dim, const int64_t* q_strides,
                           const int64_t* k_strides, const int64_t* v_strides) {
  if (head_dim != 64 && head_dim != 128) return false;
  if (!aligned16(q) || !aligned16(k) || !aligned16(v)) return false;
  for (const int64_t* strides : {q_strides, k_strides, v_strides})
    for (int i = 0; i < 3; ++i)
      if (strides[i] % 8 != 0) return false;
  int device = 0, major = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  return major >= 8;
}

cudaError_t launch_flash_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                                           int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
                                           int64_t seqlen_k, int64_t head_dim, int64_t window_left,
                                           int64_t window_right, const int64_t* q_strides, const int64_t* k_strides,
                                           const int64_t* v_strides, float scale, DType dtype,
                                           cudaStream_t stream) {
  if (seqlen_q == 0 || batch * heads_q == 0) return cudaSuccess;
  if (head_dim < 1 || head_dim > 256 || heads_kv < 1 || heads_q % heads_kv) return cudaErrorInvalidValue;
  const AttentionParams prm = attention_params(heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left,
                                                window_right, q_strides, k_strides, v_strides, scale);
  const bool fast = dtype != DType::Float32 &&
                    attention_mma_applies(q, k, v, head_dim, q_strides, k_strides, v_strides);
  cudaGetLastError();  // a failed device probe above must not be reported as this launch's error
  return GF_DISPATCH_FLOAT_TYPES(dtype, [&]() -> cudaError_t {
    if constexpr (!std::is_same_v<scalar_t, float>) {
      if (fast && head_dim == 64) return launch_mma<scalar_t, 64>(q, k, v, out, lse, batch, prm, stream);
      if (fast && head_dim == 128) return launch_mma<scalar_t, 128>(q, k, v, out, lse, batch, prm, stream);
    }
    // the per-lane register arrays are sized at compile time: D <= 32, 64, 128, 256
    if (head_dim <= 32) return launch_rowwise<scalar_t, 1>(q, k, v, out, lse, batch, prm, stream);
    if (head_dim <= 64) return launch_rowwise<scalar_t, 2>(q, k, v, out, lse, batch, prm, stream);
    if (head_dim <= 128) return launch_rowwise<scalar_t, 4>(q, k, v, out, lse, batch, prm, stream);
    return launch_rowwise<scalar_t, 8>(q, k, v, out, lse, batch, prm, stream);
  });
}
#endif  // __CUDACC_RTC__

}  // namespace gpuforge
