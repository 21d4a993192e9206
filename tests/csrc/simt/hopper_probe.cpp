// Probe kernels for the emulated Hopper instructions of hopper.h, written as a CUDA kernel would write them
// (inline PTX, which the test build translates), for tests/csrc/test_hopper_instructions.py: one 2D box of a
// tensor map (any swizzle, zero or NaN fill) loaded with cp.async.bulk.tensor into shared memory under an
// mbarrier's transaction count, with the barrier's phase parities read along the way; and one wgmma
// m64n16k16 from shared-memory descriptors, its accumulators read before and after its wait_group.
#include "driver.h"

#include "hopper.cuh"

namespace {

using namespace gpuforge;

// out[0 .. box_bytes) = shared memory after the copy was issued and before any wait; out[box_bytes ..) = after
// the wait. waits = try_wait.parity results: parity 1 and 0 before the arrival, then 0 and 1 after the phase.
__global__ void tma_box_kernel(const __grid_constant__ TensorMap map, int x, int y, int box_bytes,
                               unsigned char* out, unsigned* waits) {
  GF_DYNAMIC_SHARED(unsigned char, shared);  // offset 0 of shared memory: aligned to every swizzle pattern
  auto* bar = reinterpret_cast<unsigned long long*>(shared + box_bytes);
  if (threadIdx.x == 0) {
    mbarrier_init(bar, 1);
    mbarrier_init_fence();
  }
  __syncthreads();
  const auto try_wait = [&](unsigned parity) {
    unsigned done;
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(smem_address(bar)), "r"(parity) : "memory");
    return done;
  };
  if (threadIdx.x == 0) {
    waits[0] = try_wait(1);
    waits[1] = try_wait(0);
    mbarrier_arrive_expect_tx(bar, box_bytes);
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], "
                 "[%2];\n" ::"r"(smem_address(shared)), "l"(map_address(map)), "r"(smem_address(bar)), "r"(x), "r"(y)
                 : "memory");
  }
  __syncthreads();
  for (int i = threadIdx.x; i < box_bytes; i += blockDim.x) out[i] = shared[i];
  __syncthreads();
  mbarrier_wait(bar, 0);
  for (int i = threadIdx.x; i < box_bytes; i += blockDim.x) out[box_bytes + i] = shared[i];
  __syncthreads();
  if (threadIdx.x == 0) {
    waits[2] = try_wait(0);
    waits[3] = try_wait(1);
  }
}

// One warpgroup: shared memory = image; d (8 fp32 per thread) = 0.5 * (8 thread + i), then d = A B^T + (accumulate ?
// d : 0) with A (64x16) and B (16x16, K-major or MN-major: kTransB) read through desc_a and desc_b. before /
// after: every thread's d after the commit (before any thread's wait) and after the wait.
template <bool kTransB>
__global__ void wgmma_kernel(const unsigned char* image, int bytes, unsigned long long desc_a,
                             unsigned long long desc_b, int accumulate, float* before, float* after) {
  GF_DYNAMIC_SHARED(unsigned char, shared);
  for (int i = threadIdx.x; i < bytes; i += blockDim.x) shared[i] = image[i];
  fence_proxy_async();
  __syncthreads();
  float d[8];
  for (int i = 0; i < 8; ++i) d[i] = 0.5f * (8 * threadIdx.x + i);
  wgmma_fence();
  if constexpr (kTransB) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, "
                 "0, 1;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));
  } else {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %10, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7}, %8, %9, p, 1, 1, "
                 "0, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "l"(desc_a), "l"(desc_b), "r"(accumulate));
  }
  wgmma_commit();
  for (int i = 0; i < 8; ++i) before[8 * threadIdx.x + i] = d[i];
  named_barrier_sync(1, 128);  // every thread has read d before any thread waits (the group completes then)
  wgmma_wait<0>();
  for (int i = 0; i < 8; ++i) after[8 * threadIdx.x + i] = d[i];
}

}  // namespace

extern "C" int gf_simt_wgmma(const unsigned char* image, int bytes, unsigned long long desc_a,
                             unsigned long long desc_b, int b_mn_major, int accumulate, float* before, float* after) {
  try {
    if (b_mn_major) {
      simt::launch(dim3{1, 1, 1}, dim3{128, 1, 1}, bytes, wgmma_kernel<true>, image, bytes, desc_a, desc_b,
                   accumulate, before, after);
    } else {
      simt::launch(dim3{1, 1, 1}, dim3{128, 1, 1}, bytes, wgmma_kernel<false>, image, bytes, desc_a, desc_b,
                   accumulate, before, after);
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gf_simt_wgmma: %s\n", e.what());
    return 2;
  }
  return 0;
}

// A (rows, cols) matrix of 16-bit values (bf16) with rows `row_bytes` apart; a box of box_rows x box_cols at
// (x = column, y = row); swizzle 0..3 (none, 32, 64, 128 B); nan_fill 0/1. Returns 0, or 1 when
// cuTensorMapEncodeTiled refuses the map, 2 when the kernel failed (printed).
extern "C" int gf_simt_tma_box(const void* global, long long rows, long long cols, long long row_bytes,
                               int box_rows, int box_cols, int swizzle, int nan_fill, int x, int y,
                               unsigned char* out, unsigned* waits) {
  CUtensorMap encoded;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(row_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  if (cuTensorMapEncodeTiled(&encoded, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(global), dims, strides,
                             box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                             static_cast<CUtensorMapSwizzle>(swizzle), CU_TENSOR_MAP_L2_PROMOTION_NONE,
                             nan_fill ? CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA
                                      : CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
    return 1;
  gpuforge::TensorMap map;
  std::memcpy(&map, &encoded, sizeof map);
  const int box_bytes = box_rows * box_cols * 2;
  try {
    simt::launch(dim3{1, 1, 1}, dim3{128, 1, 1}, box_bytes + 8, tma_box_kernel, map, x, y, box_bytes, out, waits);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "gf_simt_tma_box: %s\n", e.what());
    return 2;
  }
  return 0;
}
