// Host: the tensor maps of the Hopper kernels (matmul_wgmma.cu, flash_attention_wgmma.cu), encoded with
// cuTensorMapEncodeTiled (the driver's, or the SIMT emulator's in the tests). Needs the driver API's
// declarations (CUDA's cuda.h, or tests/csrc/simt/cuda.h) and hopper.cuh's TensorMap first.
#pragma once

#include <cstdint>
#include <cstring>

namespace gpuforge {

// A row-major tensor of 16-bit values, dims[0] innermost (unit stride), strides[d] the element stride of
// dims[d] (d >= 1); boxes of 64 x box_rows x 1 x ... elements (64 values: the 128-byte swizzle's row), out-of-bounds
// elements read as zeros and not written.
template <typename Encode>
CUresult encode_box_map(Encode encode, TensorMap& map, const void* base, bool bf16, int rank, const int64_t* dims,
                        const int64_t* strides, unsigned box_rows) {
  static_assert(sizeof(TensorMap) == sizeof(CUtensorMap));
  cuuint64_t global_dims[5], global_strides[4];
  cuuint32_t box[5], element_strides[5];
  for (int d = 0; d < rank; ++d) {
    global_dims[d] = static_cast<cuuint64_t>(dims[d]);
    if (d > 0) global_strides[d - 1] = static_cast<cuuint64_t>(strides[d]) * 2;
    box[d] = d == 0 ? 64 : d == 1 ? box_rows : 1;
    element_strides[d] = 1;
  }
  CUtensorMap encoded;
  const CUresult result = encode(&encoded, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                                 static_cast<cuuint32_t>(rank), const_cast<void*>(base), global_dims, global_strides,
                                 box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  std::memcpy(&map, &encoded, sizeof map);
  return result;
}

struct MatmulWgmmaMaps {
  TensorMap a, b, c;
};

// One (batch, rows, cols) operand of the matmul; a broadcast operand (batch_stride 0) is one matrix.
template <typename Encode>
CUresult encode_operand_map(Encode encode, TensorMap& map, const void* base, bool bf16, int64_t rows,
                            int64_t cols, int64_t batch, int64_t row_stride, int64_t batch_stride,
                            unsigned box_rows) {
  const bool broadcast = batch_stride == 0;
  const int64_t dims[3] = {cols, rows, broadcast ? 1 : batch};
  const int64_t strides[3] = {1, row_stride, broadcast ? row_stride * rows : batch_stride};
  return encode_box_map(encode, map, base, bf16, 3, dims, strides, box_rows);
}

// A (batch, M, K) in boxes of 128 rows x 64 k; B (batch, K, N) in boxes of 64 k-rows x 64 columns; C (batch,
// M, N, contiguous) in boxes of 64 rows x 64 columns.
template <typename Encode>
CUresult encode_matmul_wgmma_maps(Encode encode, MatmulWgmmaMaps& maps, const void* a, const void* b, void* c,
                                  int64_t M, int64_t N, int64_t K, int64_t batch, int64_t sa_z, int64_t sa_m,
                                  int64_t sb_z, int64_t sb_k, bool bf16) {
  CUresult r = encode_operand_map(encode, maps.a, a, bf16, M, K, batch, sa_m, sa_z, 128);
  if (r == CUDA_SUCCESS) r = encode_operand_map(encode, maps.b, b, bf16, K, N, batch, sb_k, sb_z, 64);
  if (r == CUDA_SUCCESS) r = encode_operand_map(encode, maps.c, c, bf16, M, N, batch, N, M * N, 64);
  return r;
}

struct AttentionWgmmaMaps {
  TensorMap q, k, v, out;
};

// q (B, Hq, Sq, D), k and v (B, Hkv, Sk, D) with element strides {batch, head, row} and D contiguous, in boxes
// of 128 rows x 64 of D; out (B, Hq, Sq, D, contiguous) in boxes of 64 rows x 64 of D.
template <typename Encode>
CUresult encode_attention_wgmma_maps(Encode encode, AttentionWgmmaMaps& maps, const void* q, const void* k,
                                     const void* v, void* out, int64_t batch, int64_t heads_q, int64_t heads_kv,
                                     int64_t seqlen_q, int64_t seqlen_k, int64_t head_dim, const int64_t* q_strides,
                                     const int64_t* k_strides, const int64_t* v_strides, bool bf16) {
  const auto encode4 = [&](TensorMap& map, const void* base, int64_t heads, int64_t rows, const int64_t* s,
                           unsigned box_rows) {
    const int64_t dims[4] = {head_dim, rows, heads, batch};
    const int64_t strides[4] = {1, s[2], s[1], s[0]};
    return encode_box_map(encode, map, base, bf16, 4, dims, strides, box_rows);
  };
  const int64_t out_strides[3] = {heads_q * seqlen_q * head_dim, seqlen_q * head_dim, head_dim};
  CUresult r = encode4(maps.q, q, heads_q, seqlen_q, q_strides, 128);
  if (r == CUDA_SUCCESS) r = encode4(maps.k, k, heads_kv, seqlen_k, k_strides, 128);
  if (r == CUDA_SUCCESS) r = encode4(maps.v, v, heads_kv, seqlen_k, v_strides, 128);
  if (r == CUDA_SUCCESS) r = encode4(maps.out, out, heads_q, seqlen_q, out_strides, 64);
  return r;
}

#ifdef CUDART_VERSION
// The driver's cuTensorMapEncodeTiled (through the runtime, so the extension needs no -lcuda), or nullptr.
inline PFN_cuTensorMapEncodeTiled_v12000 driver_tensor_map_encoder() {
  void* encode = nullptr;
  cudaDriverEntryPointQueryResult found{};
  if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &encode, 12000, cudaEnableDefault, &found) !=
          cudaSuccess ||
      found != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(encode);
}
#endif

}  // namespace gpuforge
