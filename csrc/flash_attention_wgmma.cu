// Attention forward on Hopper (sm_90a), FlashAttention-3 style: TMA loads, an mbarrier pipeline, wgmma and
// warp specialisation. fp16/bf16, head dim 128, the bottom-right aligned window of flash_attention.cu (causal
// is window_right = 0), GQA by head index mapping; out rounded once, lse in fp32 (natural log).
//
// A block of 384 threads owns 128 query rows of one (batch, head):
//  - warpgroup 0, the producer, gives its registers away (setmaxnreg.dec) and one of its threads loads the Q
//    tile once, then streams the 128-key tiles of K and V through a 2-stage ring of shared memory with TMA; K
//    and V have their own `full` mbarriers (so S = Q Kᵀ starts before V has landed) and `empty` ones (both
//    consumers done with the stage);
//  - warpgroups 1 and 2, the consumers, take the registers (setmaxnreg.inc) and each owns 64 query rows: S = Q
//    Kᵀ is eight wgmma m64n128k16 with Q and K read from shared memory through 128-byte-swizzled descriptors
//    (both K-major); the online softmax runs on the 64 fp32 scores per thread in registers (log2 domain; a
//    quad of 4 threads shares a row); P is re-packed in registers as the A operand of O += P V, eight wgmma
//    m64n128k16 with A from registers and V MN-major, so P never touches shared memory;
//  - the softmax of key tile j + 1 overlaps the P V product of tile j: the consumer issues S(j + 1) and then
//    P(j) V(j), waits for S(j + 1) only, computes its softmax while the tensor cores work on P V, and rescales
//    O once that product is done (FlashAttention-3's intra-warpgroup pipelining);
//  - the epilogue writes each consumer's normalised 64x128 O, rounded, into its own rows of the Q tile (no
//    longer read) in the tensor map's swizzled layout, and one thread stores it with TMA, which clips rows past
//    Sq.
// What stays in SRAM: the Q tile (32 KiB), 2 stages of K and V (128 KiB) and the barriers; S, P, O and the
// softmax statistics live in registers. Keys and rows past the ends are zero-filled by TMA and masked.
#include "attention_params.cuh"
#include "hopper.cuh"

namespace gpuforge {

constexpr int kFa3BlockM = 128;  // query rows per block: two consumer warpgroups x 64
constexpr int kFa3BlockN = 128;  // keys per stage
constexpr int kFa3HeadDim = 128;
constexpr int kFa3Stages = 2;
constexpr int kFa3Threads = 384;
constexpr int kFa3BoxBytes = 128 * 128;          // a TMA box: 128 rows x 64 16-bit values (one swizzle row each)
constexpr int kFa3TileBytes = 2 * kFa3BoxBytes;  // 128 rows x D: the boxes of D 0-63 and 64-127
// + 1024: the start is rounded up to the 128-byte swizzle's 1024-byte pattern; Q, then K and V stages, then
// the barriers (q_full, k_full, v_full, k_empty, v_empty).
constexpr int kFa3SharedBytes = 1024 + (1 + 2 * kFa3Stages) * kFa3TileBytes + (1 + 4 * kFa3Stages) * 8;

template <typename T>
__global__ void __launch_bounds__(kFa3Threads, 1)
flash_attention_fwd_wgmma_kernel(const __grid_constant__ TensorMap q_map,    // (B, Hq, Sq, D), box 128 x 64
                                 const __grid_constant__ TensorMap k_map,    // (B, Hkv, Sk, D), box 128 x 64
                                 const __grid_constant__ TensorMap v_map,    // (B, Hkv, Sk, D), box 128 x 64
                                 const __grid_constant__ TensorMap out_map,  // (B, Hq, Sq, D), box 64 x 64
                                 float* __restrict__ lse,                    // (B, Hq, Sq)
                                 AttentionParams prm) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for sm_90a only; the launcher never starts it elsewhere
#else
  GF_DYNAMIC_SHARED(unsigned char, raw_shared);
  unsigned char* const shared = raw_shared + (1024 - smem_address(raw_shared) % 1024) % 1024;
  unsigned char* const q_tile = shared;
  unsigned char* const k_stages = q_tile + kFa3TileBytes;
  unsigned char* const v_stages = k_stages + kFa3Stages * kFa3TileBytes;
  auto* const q_full = reinterpret_cast<unsigned long long*>(v_stages + kFa3Stages * kFa3TileBytes);
  auto* const k_full = q_full + 1;
  auto* const v_full = k_full + kFa3Stages;
  auto* const k_empty = v_full + kFa3Stages;
  auto* const v_empty = k_empty + kFa3Stages;

  const int warpgroup = threadIdx.x / 128, thread = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
    for (int s = 0; s < kFa3Stages; ++s) {
      mbarrier_init(&k_full[s], 1);  // the producer's arrive.expect_tx
      mbarrier_init(&v_full[s], 1);
      mbarrier_init(&k_empty[s], 2);  // one arrival per consumer
      mbarrier_init(&v_empty[s], 2);
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  // Heaviest query tiles (the last ones under a causal mask) first; the keys any row of the tile sees, in
  // whole 128-key tiles.
  const long long m0 = static_cast<long long>(gridDim.x - 1 - blockIdx.x) * kFa3BlockM;
  const long long bh = blockIdx.y, b = bh / prm.heads_q, h = bh % prm.heads_q;
  const long long hk = h / (prm.heads_q / prm.heads_kv);
  const long long shift = prm.seqlen_k - prm.seqlen_q;
  const long long last_row = min(m0 + kFa3BlockM, prm.seqlen_q) - 1;
  const long long key_lo = prm.window_left < 0 ? 0 : max(0LL, m0 + shift - prm.window_left);
  const long long key_hi =
      prm.window_right < 0 ? prm.seqlen_k : min(prm.seqlen_k, last_row + shift + prm.window_right + 1);
  const int tile_lo = static_cast<int>(key_lo / kFa3BlockN);
  const int tile_hi = key_hi > key_lo ? static_cast<int>((key_hi + kFa3BlockN - 1) / kFa3BlockN) : tile_lo;

  int stage = 0;
  unsigned phase = 0;
  const auto advance = [&] {
    if (++stage == kFa3Stages) stage = 0, phase ^= 1;
  };

  if (warpgroup == 0) {
    setmaxnreg_dec<24>();
    if (thread != 0) return;
    mbarrier_arrive_expect_tx(q_full, kFa3TileBytes);
    for (int box = 0; box < 2; ++box)
      tma_load_4d(q_tile + box * kFa3BoxBytes, q_map, q_full, 64 * box, int(m0), int(h), int(b));
    for (int tile = tile_lo; tile < tile_hi; ++tile, advance()) {
      const int n0 = tile * kFa3BlockN;
      mbarrier_wait(&k_empty[stage], phase ^ 1);  // both consumers are done with this stage's last use
      mbarrier_arrive_expect_tx(&k_full[stage], kFa3TileBytes);
      for (int box = 0; box < 2; ++box)
        tma_load_4d(k_stages + stage * kFa3TileBytes + box * kFa3BoxBytes, k_map, &k_full[stage], 64 * box, n0,
                    int(hk), int(b));
      mbarrier_wait(&v_empty[stage], phase ^ 1);
      mbarrier_arrive_expect_tx(&v_full[stage], kFa3TileBytes);
      for (int box = 0; box < 2; ++box)
        tma_load_4d(v_stages + stage * kFa3TileBytes + box * kFa3BoxBytes, v_map, &v_full[stage], 64 * box, n0,
                    int(hk), int(b));
    }
    return;
  }

  setmaxnreg_inc<240>();
  const int consumer = warpgroup - 1;
  const int warp = thread / 32, g = (thread % 32) / 4, t = thread % 4;
  const long long row0 = m0 + 64 * consumer + 16 * warp + g;  // this thread's rows: row0 and row0 + 8
  unsigned char* const q_rows = q_tile + consumer * 64 * 128;  // this consumer's 64 rows in each box
  const float neg_inf = -__int_as_float(0x7f800000);  // -inf (NVRTC has no INFINITY macro)
  const float scale_log2 = prm.scale * 1.4426950408889634f;  // exp(x) = 2^(x log2 e)
  float s[64];        // scores, then probabilities, of one key tile: the accumulator map of an m64n128 wgmma
  float o[64] = {};   // the output rows, unnormalised
  unsigned p[8][4];   // P of the tile in flight: k16 block j = accumulator values 8j..8j+7, packed
  float m_run[2] = {neg_inf, neg_inf}, l_run[2] = {0.f, 0.f};  // rows row0, row0 + 8 (log2 units)
  float alpha[2];     // the factors that rescale O's rows for the newest softmax

  // S = Q Kᵀ of the stage's key tile into s: eight k16 steps over D (four per box, 32 bytes apart in the
  // swizzled rows), Q and K K-major, 8-row groups 1024 bytes apart.
  const auto issue_scores = [&](int st) {
    const unsigned char* const keys = k_stages + st * kFa3TileBytes;
#pragma unroll
    for (int kk = 0; kk < kFa3HeadDim / 16; ++kk) {
      const int at = (kk / 4) * kFa3BoxBytes + 32 * (kk % 4);
      wgmma_m64n128k16<T, 0>(s, smem_descriptor_sw128(q_rows + at, 16, 1024),
                             smem_descriptor_sw128(keys + at, 16, 1024), kk > 0);
    }
    wgmma_commit();
  };
  // O += P V of the stage's value tile: eight k16 steps over the keys (16 rows of 128 bytes each), P from
  // registers, V MN-major with D's second 64 columns one box on (the leading offset).
  const auto issue_values = [&](int st) {
    const unsigned char* const values = v_stages + st * kFa3TileBytes;
#pragma unroll
    for (int kk = 0; kk < kFa3BlockN / 16; ++kk)
      wgmma_m64n128k16_rs<T>(o, p[kk], smem_descriptor_sw128(values + 16 * 128 * kk, kFa3BoxBytes, 1024), 1);
    wgmma_commit();
  };
  // The scores of key tile `tile` -> probabilities 2^(s - m) in s, with the running max and sum and `alpha`.
  // Element-wise masks only on tiles crossing Sk or a window edge (uniform per block).
  const auto softmax = [&](int tile) {
    const long long n0 = static_cast<long long>(tile) * kFa3BlockN;
    const bool masked = n0 + kFa3BlockN > prm.seqlen_k ||
                        (prm.window_right >= 0 && n0 + kFa3BlockN - 1 > m0 + shift + prm.window_right) ||
                        (prm.window_left >= 0 && n0 < last_row + shift - prm.window_left);
#pragma unroll
    for (int v = 0; v < 64; ++v) {
      float x = s[v] * scale_log2;
      if (masked) {
        const long long key = n0 + 8 * (v / 4) + 2 * t + v % 2;
        const long long diag = row0 + 8 * ((v / 2) % 2) + shift;
        const bool visible = key < prm.seqlen_k && (prm.window_left < 0 || key >= diag - prm.window_left) &&
                             (prm.window_right < 0 || key <= diag + prm.window_right);
        x = visible ? x : neg_inf;
      }
      s[v] = x;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_run[r];
#pragma unroll
      for (int v = 2 * r; v < 64; v += 4) mx = fmaxf(mx, fmaxf(s[v], s[v + 1]));
      mx = quad_max(mx);
      const float base = mx == neg_inf ? 0.f : mx;  // a row with no visible key yet: P = 0, no NaN
      alpha[r] = exp2f(m_run[r] - base);             // m_run = -inf on the first tile: alpha = 0
      m_run[r] = mx;
      float sum = 0.f;
#pragma unroll
      for (int v = 2 * r; v < 64; v += 4) {
        s[v] = exp2f(s[v] - base);
        s[v + 1] = exp2f(s[v + 1] - base);
        sum += s[v] + s[v + 1];
      }
      l_run[r] = l_run[r] * alpha[r] + sum;
    }
  };
  const auto rescale_and_pack = [&] {
#pragma unroll
    for (int v = 0; v < 64; ++v) o[v] *= alpha[(v / 2) % 2];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) p[j][r] = pack_pair<T>(s[8 * j + 2 * r], s[8 * j + 2 * r + 1]);
  };

  mbarrier_wait(q_full, 0);  // also before the epilogue reuses the Q tile: the load must have landed
  if (tile_lo < tile_hi) {
    mbarrier_wait(&k_full[stage], phase);
    wgmma_fence();
    issue_scores(stage);
    wgmma_wait<0>();
    pin_registers(s);  // read below, after the wait
    if (thread == 0) mbarrier_arrive(&k_empty[stage]);
    softmax(tile_lo);
    rescale_and_pack();
  }
  // Straight-line steady state (every wgmma unconditional, so the compiler keeps the groups in flight): the
  // scores of tile + 1 and P V of tile, the softmax of tile + 1 between the two waits.
  for (int tile = tile_lo; tile + 1 < tile_hi; ++tile) {
    const int current = stage;
    const unsigned current_phase = phase;
    advance();
    mbarrier_wait(&k_full[stage], phase);
    mbarrier_wait(&v_full[current], current_phase);  // loaded before the next K: no wait in practice
    wgmma_fence();  // o and p were written by ordinary instructions
    issue_scores(stage);
    issue_values(current);
    wgmma_wait<1>();  // S of the next tile is done; P V may still run while its softmax does
    pin_registers(s);
    if (thread == 0) mbarrier_arrive(&k_empty[stage]);
    softmax(tile + 1);
    wgmma_wait<0>();
    pin_registers(o);  // P V is done: O may be rescaled and P rewritten
    pin_registers(p);
    if (thread == 0) mbarrier_arrive(&v_empty[current]);
    rescale_and_pack();
  }
  if (tile_lo < tile_hi) {  // the last tile's P V
    mbarrier_wait(&v_full[stage], phase);
    wgmma_fence();
    issue_values(stage);
    wgmma_wait<0>();
    pin_registers(o);
    if (thread == 0) mbarrier_arrive(&v_empty[stage]);
  }

  // Normalise; LSE per row (a row that sees no key gets zeros and LSE -inf, as the other kernels).
  float inv_l[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long row = row0 + 8 * r;
    const float l = quad_sum(l_run[r]);
    inv_l[r] = l > 0.f ? 1.f / l : 0.f;
    if (t == 0 && row < prm.seqlen_q)
      lse[bh * prm.seqlen_q + row] = l > 0.f ? m_run[r] * 0.6931471805599453f + logf(l) : neg_inf;
  }
#pragma unroll
  for (int v = 0; v < 64; v += 2) {  // accumulator map: row 16 warp + g (+8), column 8 (v / 4) + 2 t
    const int row = 16 * warp + g + 8 * ((v / 2) % 2), col = 8 * (v / 4) + 2 * t;
    const unsigned offset = (col / 64) * kFa3BoxBytes + swizzle_128b(row * 128 + (col % 64) * 2);
    store_pair(reinterpret_cast<T*>(q_rows + offset), o[v] * inv_l[(v / 2) % 2], o[v + 1] * inv_l[(v / 2) % 2]);
  }
  fence_proxy_async();  // the writes above, visible to the TMA store
  named_barrier_sync(1 + consumer, 128);
  if (thread == 0) {
    for (int box = 0; box < 2; ++box)
      tma_store_4d(out_map, q_rows + box * kFa3BoxBytes, 64 * box, int(m0) + 64 * consumer, int(h), int(b));
    tma_store_commit();
    tma_store_wait_read<0>();
  }
#endif
}

}  // namespace gpuforge

#ifndef __CUDACC_RTC__
#include <cuda.h>
#include <cudaTypedefs.h>

#include "launchers.h"
#include "tensor_maps.h"

namespace gpuforge {

bool flash_attention_wgmma_applies(const void* q, const void* k, const void* v, int64_t seqlen_k, int64_t head_dim,
                                   const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides,
                                   DType dtype) {
  if (dtype == DType::Float32 || head_dim != kFa3HeadDim || seqlen_k == 0) return false;
  if (!aligned16(q) || !aligned16(k) || !aligned16(v)) return false;
  for (const int64_t* strides : {q_strides, k_strides, v_strides})
    for (int i = 0; i < 3; ++i)
      if (strides[i] % 8 != 0) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  return major == 9 && minor == 0;  // sm_90a code runs on compute capability 9.0 only
}

cudaError_t launch_flash_attention_forward_wgmma(const void* q, const void* k, const void* v, void* out, float* lse,
                                                 int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
                                                 int64_t seqlen_k, int64_t head_dim, int64_t window_left,
                                                 int64_t window_right, const int64_t* q_strides,
                                                 const int64_t* k_strides, const int64_t* v_strides, float scale,
                                                 DType dtype, cudaStream_t stream) {
  if (seqlen_q == 0 || batch * heads_q == 0) return cudaSuccess;
  if (heads_kv < 1 || heads_q % heads_kv) return cudaErrorInvalidValue;
  const bool applies =
      flash_attention_wgmma_applies(q, k, v, seqlen_k, head_dim, q_strides, k_strides, v_strides, dtype);
  cudaGetLastError();  // a failed probe above must not be reported as this launch's error
  if (!applies || seqlen_q > INT32_MAX || seqlen_k > INT32_MAX) return cudaErrorNotSupported;
  const auto encode = driver_tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  AttentionWgmmaMaps maps;
  if (encode_attention_wgmma_maps(encode, maps, q, k, v, out, batch, heads_q, heads_kv, seqlen_q, seqlen_k,
                                  head_dim, q_strides, k_strides, v_strides, dtype == DType::BFloat16) != CUDA_SUCCESS)
    return cudaErrorInvalidValue;
  const AttentionParams prm = attention_params(heads_q, heads_kv, seqlen_q, seqlen_k, head_dim, window_left,
                                                window_right, q_strides, k_strides, v_strides, scale);
  const dim3 grid(static_cast<unsigned>((seqlen_q + kFa3BlockM - 1) / kFa3BlockM),
                  static_cast<unsigned>(batch * heads_q));
  const auto launch = [&](auto kernel) -> cudaError_t {
    GF_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kFa3SharedBytes));
    kernel<<<grid, kFa3Threads, kFa3SharedBytes, stream>>>(maps.q, maps.k, maps.v, maps.out, lse, prm);
    return cudaGetLastError();
  };
  return dtype == DType::BFloat16 ? launch(flash_attention_fwd_wgmma_kernel<__nv_bfloat16>)
                                  : launch(flash_attention_fwd_wgmma_kernel<__half>);
}

}  // namespace gpuforge
#endif
