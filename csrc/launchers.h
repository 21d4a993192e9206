// Host launchers of every kernel in csrc/, called by bindings.cpp. Torch-free: raw device pointers, sizes,
// strides, a DType code and a stream. Each returns the first CUDA error it met (cudaSuccess otherwise).
#pragma once

#include <cuda_runtime_api.h>
#include <cstdint>

#include "dtype.h"

namespace gpuforge {

// A 16-byte aligned pointer: what vectorised (uint4) accesses, cp.async and tensor maps need.
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

cudaError_t launch_vector_add(const void* a, const void* b, void* out, int64_t n, DType dtype,
                              cudaStream_t stream);

// Softmax over the last dim of (rows, n) views with contiguous last dims (csrc/softmax.cu): y = softmax(x) and
// dx = y * (dy - sum(dy * y)); y and dx contiguous. Warp-per-row, cached block-per-row or streaming kernels by n.
cudaError_t launch_softmax_forward(const void* x, int64_t x_row_stride, void* y, int64_t rows, int64_t n,
                                   DType dtype, cudaStream_t stream);
cudaError_t launch_softmax_backward(const void* dy, int64_t dy_row_stride, const void* y, void* dx, int64_t rows,
                                    int64_t n, DType dtype, cudaStream_t stream);

// c (batch, M, N, contiguous) = a (batch, M, K) @ b (batch, K, N); a and b with element strides (s*_z is 0
// for a broadcast operand). Tensor cores for fp16/bf16 where the layout allows, the tiled kernel otherwise.
cudaError_t launch_matmul(const void* a, const void* b, void* c, int64_t M, int64_t N, int64_t K, int64_t batch,
                          int64_t sa_z, int64_t sa_m, int64_t sa_k, int64_t sb_z, int64_t sb_k, int64_t sb_n,
                          DType dtype, cudaStream_t stream);

// The same product on Hopper (csrc/matmul_wgmma.cu: TMA, mbarriers, wgmma, warp-specialised persistent tiles)
// for fp16/bf16 with rows contiguous and 16-byte aligned (K, N and the strides multiples of 8) on a compute
// capability 9.0 device; cudaErrorNotSupported anywhere else.
bool matmul_wgmma_applies(const void* a, const void* b, int64_t N, int64_t K, int64_t sa_z, int64_t sa_m,
                          int64_t sa_k, int64_t sb_z, int64_t sb_k, int64_t sb_n, DType dtype);
cudaError_t launch_matmul_wgmma(const void* a, const void* b, void* c, int64_t M, int64_t N, int64_t K,
                                int64_t batch, int64_t sa_z, int64_t sa_m, int64_t sa_k, int64_t sb_z, int64_t sb_k,
                                int64_t sb_n, DType dtype, cudaStream_t stream);

// out (M, N) = x (M, K) @ dequant(W)ᵀ, W (N, K) int4 (csrc/int4_matmul.cu for the format). split_k == 0: the
// tiled kernel (any M); split_k >= 1: the decode kernel (M <= 16, K and group_size multiples of 32, K / split_k
// a multiple of 32, 16-byte-aligned x and qweight) with `workspace` fp32 (split_k, M, N) when split_k > 1.
cudaError_t launch_int4_matmul(const void* x, const unsigned char* qweight, const void* scales,
                               const unsigned char* zeros, void* out, float* workspace, int64_t M, int64_t N,
                               int64_t K, int64_t group_size, int64_t split_k, DType x_dtype, DType scale_dtype,
                               cudaStream_t stream);

// RMSNorm over the last dim of (rows, n) views with contiguous last dims (csrc/rms_norm.cu). residual and h
// may be null (no fused add); rstd (rows,) fp32 is written for the backward.
cudaError_t launch_rms_norm_forward(const void* x, int64_t x_row_stride, const void* residual,
                                    int64_t residual_row_stride, const void* weight, void* y, void* h, float* rstd,
                                    int64_t rows, int64_t n, float eps, DType dtype, cudaStream_t stream);

// The number of row bands (blocks) the backward uses for `rows` rows on `device`.
cudaError_t rms_norm_backward_blocks(int64_t rows, int device, int* blocks);

// dx (rows, n) and dw (n,) of RMSNorm; dh (may be null) is added to dx. `partial` is fp32 scratch: (blocks, n)
// when deterministic, else (1, n) zeroed by the caller (atomics). n * 4 bytes of shared memory per block.
cudaError_t launch_rms_norm_backward(const void* dy, int64_t dy_row_stride, const void* x, int64_t x_row_stride,
                                     const void* weight, const float* rstd, const void* dh, int64_t dh_row_stride,
                                     void* dx, void* dw, float* partial, int blocks, int64_t rows, int64_t n,
                                     bool deterministic, DType dtype, cudaStream_t stream);

// out (batch, heads_q, seqlen_q, D, contiguous) and lse (batch, heads_q, seqlen_q) fp32, natural log, -inf for a
// row that sees no key (csrc/flash_attention.cu: tensor cores for fp16/bf16, D 64/128, 16-byte aligned rows on
// sm_80+; the row-per-warp baseline otherwise; D <= 256). q, k, v have unit stride
// along D and element strides {batch, head, row} in *_strides; query i sees key j when
// i + (seqlen_k - seqlen_q) - window_left <= j <= i + (seqlen_k - seqlen_q) + window_right (-1: unbounded).
cudaError_t launch_flash_attention_forward(const void* q, const void* k, const void* v, void* out, float* lse,
                                           int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
                                           int64_t seqlen_k, int64_t head_dim, int64_t window_left,
                                           int64_t window_right, const int64_t* q_strides, const int64_t* k_strides,
                                           const int64_t* v_strides, float scale, DType dtype,
                                           cudaStream_t stream);

// The same on Hopper (csrc/flash_attention_wgmma.cu: TMA, wgmma, warp specialisation): fp16/bf16, D 128, pointers
// 16-byte aligned, strides multiples of 8, seqlen_k > 0, compute capability 9.0; cudaErrorNotSupported otherwise.
bool flash_attention_wgmma_applies(const void* q, const void* k, const void* v, int64_t seqlen_k, int64_t head_dim,
                                   const int64_t* q_strides, const int64_t* k_strides, const int64_t* v_strides,
                                   DType dtype);
cudaError_t launch_flash_attention_forward_wgmma(const void* q, const void* k, const void* v, void* out, float* lse,
                                                 int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
                                                 int64_t seqlen_k, int64_t head_dim, int64_t window_left,
                                                 int64_t window_right, const int64_t* q_strides,
                                                 const int64_t* k_strides, const int64_t* v_strides, float scale,
                                                 DType dtype, cudaStream_t stream);

// The tensor-core forward's preconditions (csrc/flash_attention.cu), shared by the tensor-core backward: D 64
// or 128, q, k, v 16-byte aligned with strides multiples of 8 (cp.async rows), an sm_80+ device.
bool attention_mma_applies(const void* q, const void* k, const void* v, int64_t head_dim, const int64_t* q_strides,
                           const int64_t* k_strides, const int64_t* v_strides);

// dq (B, Hq, Sq, D), dk and dv (B, Hkv, Sk, D), all contiguous, of the attention above (csrc/flash_attention_bwd.cu:
// probabilities recomputed from q, k and the forward's lse; tensor cores where the forward's apply, else the
// row-per-warp baseline; no atomics, so bit-reproducible). q, k, v strided as
// for the forward; out and dout contiguous like the forward's output; lse, dlse and the fp32 scratch `delta`
// (B, Hq, Sq). D <= 256.
cudaError_t launch_flash_attention_backward(const void* q, const void* k, const void* v, const void* out,
                                            const void* dout, const float* lse, const float* dlse, void* dq,
                                            void* dk, void* dv, float* delta, int64_t batch, int64_t heads_q,
                                            int64_t heads_kv, int64_t seqlen_q, int64_t seqlen_k, int64_t head_dim,
                                            int64_t window_left, int64_t window_right, const int64_t* q_strides,
                                            const int64_t* k_strides, const int64_t* v_strides, float scale,
                                            DType dtype, cudaStream_t stream);

// dq, dk, dv as above from delta (already computed) on tensor cores (csrc/flash_attention_bwd_mma.cu): fp16/bf16,
// D 64 or 128, attention_mma_applies' preconditions the caller's; cudaErrorNotSupported for another dtype or D.
cudaError_t launch_flash_attention_backward_mma(const void* q, const void* k, const void* v, const void* dout,
                                                const float* lse, const float* delta, void* dq, void* dk, void* dv,
                                                int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t seqlen_q,
                                                int64_t seqlen_k, int64_t head_dim, int64_t window_left,
                                                int64_t window_right, const int64_t* q_strides,
                                                const int64_t* k_strides, const int64_t* v_strides, float scale,
                                                DType dtype, cudaStream_t stream);

}  // namespace gpuforge
