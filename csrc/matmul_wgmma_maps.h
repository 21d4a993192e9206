// Host: the three tensor maps of matmul_wgmma.cu's kernel, encoded with cuTensorMapEncodeTiled (the driver's,
// or the SIMT emulator's in the tests). Needs the driver API's declarations (CUDA's cuda.h, or
// tests/csrc/simt/cuda.h) and hopper.cuh's TensorMap first.
#pragma once

#include <cstdint>
#include <cstring>

namespace gpuforge {

struct MatmulWgmmaMaps {
  TensorMap a, b, c;
};

// One (batch, rows, cols) row-major operand of 16-bit values: box 1 x box_rows x 64 columns (128 bytes: the
// 128-byte swizzle's row), out-of-bounds elements read as zeros. A broadcast operand (batch_stride 0) is one
// matrix.
template <typename Encode>
CUresult encode_operand_map(Encode encode, TensorMap& map, const void* base, bool bf16, int64_t rows,
                            int64_t cols, int64_t batch, int64_t row_stride, int64_t batch_stride,
                            unsigned box_rows) {
  static_assert(sizeof(TensorMap) == sizeof(CUtensorMap));
  const bool broadcast = batch_stride == 0;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(broadcast ? 1 : batch)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(row_stride) * 2,
                                 static_cast<cuuint64_t>(broadcast ? row_stride * rows : batch_stride) * 2};
  const cuuint32_t box[3] = {64, box_rows, 1};
  const cuuint32_t element_strides[3] = {1, 1, 1};
  CUtensorMap encoded;
  const CUresult result = encode(&encoded, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                                 3, const_cast<void*>(base), dims, strides, box, element_strides,
                                 CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                 CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  std::memcpy(&map, &encoded, sizeof map);
  return result;
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

}  // namespace gpuforge
