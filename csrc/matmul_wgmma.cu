// Batched matmul C[z] = A[z] @ B[z] on Hopper (sm_90a): TMA loads, an mbarrier pipeline, wgmma from
// shared-memory descriptors, warp-specialised and persistent. fp16/bf16, fp32 accumulation, one rounding.
// A (batch, M, K) and B (batch, K, N) row-major with rows 16-byte aligned (K, N and the strides multiples of 8),
// C (batch, M, N) contiguous; a batch stride of 0 broadcasts an operand.
//
// A block of 384 threads owns 128x128 tiles of C, taken in turn (tile blockIdx.x, then + gridDim.x, ...):
//  - warpgroup 0, the producer, gives its registers away (setmaxnreg.dec) and one of its threads streams the
//    64-wide K slabs of A (128x64, K-major) and B (64x128, MN-major, two 64-column boxes) into a 4-stage ring
//    of shared memory with TMA, each stage guarded by a `full` mbarrier (the copies' bytes) and an `empty` one
//    (both consumers done with it);
//  - warpgroups 1 and 2, the consumers, take the registers (setmaxnreg.inc) and each computes 64 rows of the
//    tile: per slab four wgmma m64n128k16 read A and B from shared memory through 128-byte-swizzled
//    descriptors into 64 fp32 accumulators per thread; one wgmma group stays in flight while the previous
//    slab's stage is handed back to the producer;
//  - the epilogue writes each consumer's 64x128 result, rounded, into shared memory in the same swizzled
//    layout (bank-conflict free), and one thread stores it with TMA, which clips the matrix edges; the next
//    tile's mainloop overlaps that store.
// What stays in SRAM: the 4 stages of A and B (128 KiB), the two consumers' output tiles (32 KiB) and the
// barriers; the accumulators live in registers. K, M and N edges are zero-filled by TMA, so any M works.
#include "hopper.cuh"

namespace gpuforge {

constexpr int kWgmmaBlockM = 128;
constexpr int kWgmmaBlockN = 128;
constexpr int kWgmmaBlockK = 64;  // 128 bytes of 16-bit values: one swizzle row
constexpr int kWgmmaStages = 4;
constexpr int kWgmmaThreads = 384;
constexpr int kWgmmaStageBytesA = kWgmmaBlockM * kWgmmaBlockK * 2;
constexpr int kWgmmaStageBytesB = kWgmmaBlockK * kWgmmaBlockN * 2;
constexpr int kWgmmaHalfBytesB = kWgmmaStageBytesB / 2;  // one 64-column box of B: 64 k-rows x 128 bytes
constexpr int kWgmmaOutBytes = 64 * kWgmmaBlockN * 2;    // one consumer's 64 rows, two 64-column boxes
// + 1024: the start is rounded up to the 128-byte swizzle's 1024-byte pattern.
constexpr int kWgmmaSharedBytes = 1024 + kWgmmaStages * (kWgmmaStageBytesA + kWgmmaStageBytesB) +
                                  2 * kWgmmaOutBytes + 2 * kWgmmaStages * 8;

template <typename T>
__global__ void __launch_bounds__(kWgmmaThreads, 1)
matmul_wgmma_kernel(const __grid_constant__ TensorMap a_map,  // (batch_a, M, K), box 1 x 128 x 64
                    const __grid_constant__ TensorMap b_map,  // (batch_b, K, N), box 1 x 64 x 64
                    const __grid_constant__ TensorMap c_map,  // (batch, M, N), box 1 x 64 x 64
                    int M, int N, int K, int batch, int a_batched, int b_batched) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // built for sm_90a only; the launcher never starts it elsewhere
#else
  GF_DYNAMIC_SHARED(unsigned char, raw_shared);
  unsigned char* const shared = raw_shared + (1024 - smem_address(raw_shared) % 1024) % 1024;
  unsigned char* const a_stages = shared;
  unsigned char* const b_stages = a_stages + kWgmmaStages * kWgmmaStageBytesA;
  unsigned char* const out_tiles = b_stages + kWgmmaStages * kWgmmaStageBytesB;
  auto* const full = reinterpret_cast<unsigned long long*>(out_tiles + 2 * kWgmmaOutBytes);
  auto* const empty = full + kWgmmaStages;

  const int warpgroup = threadIdx.x / 128, thread = threadIdx.x % 128;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kWgmmaStages; ++s) {
      mbarrier_init(&full[s], 1);   // the producer's arrive.expect_tx
      mbarrier_init(&empty[s], 2);  // one arrival per consumer
    }
    mbarrier_init_fence();
  }
  __syncthreads();

  const int tiles_m = (M + kWgmmaBlockM - 1) / kWgmmaBlockM, tiles_n = (N + kWgmmaBlockN - 1) / kWgmmaBlockN;
  const long long tiles = static_cast<long long>(tiles_m) * tiles_n * batch;
  const int slabs = (K + kWgmmaBlockK - 1) / kWgmmaBlockK;
  int stage = 0;
  unsigned phase = 0;
  const auto advance = [&] {
    if (++stage == kWgmmaStages) stage = 0, phase ^= 1;
  };

  if (warpgroup == 0) {
    setmaxnreg_dec<40>();
    if (thread != 0) return;
    for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
      const int z = static_cast<int>(tile / (tiles_m * tiles_n)), rest = static_cast<int>(tile % (tiles_m * tiles_n));
      const int m0 = rest / tiles_n * kWgmmaBlockM, n0 = rest % tiles_n * kWgmmaBlockN;
      for (int slab = 0; slab < slabs; ++slab, advance()) {
        mbarrier_wait(&empty[stage], phase ^ 1);  // the consumers are done with this stage's last use
        mbarrier_arrive_expect_tx(&full[stage], kWgmmaStageBytesA + kWgmmaStageBytesB);
        const int k0 = slab * kWgmmaBlockK;
        unsigned char* const b_stage = b_stages + stage * kWgmmaStageBytesB;
        tma_load_3d(a_stages + stage * kWgmmaStageBytesA, a_map, &full[stage], k0, m0, a_batched ? z : 0);
        tma_load_3d(b_stage, b_map, &full[stage], n0, k0, b_batched ? z : 0);
        tma_load_3d(b_stage + kWgmmaHalfBytesB, b_map, &full[stage], n0 + 64, k0, b_batched ? z : 0);
      }
    }
    return;
  }

  setmaxnreg_inc<232>();
  const int consumer = warpgroup - 1;
  unsigned char* const out = out_tiles + consumer * kWgmmaOutBytes;
  float acc[64] = {};
  for (long long tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int z = static_cast<int>(tile / (tiles_m * tiles_n)), rest = static_cast<int>(tile % (tiles_m * tiles_n));
    const int m0 = rest / tiles_n * kWgmmaBlockM + 64 * consumer, n0 = rest % tiles_n * kWgmmaBlockN;
    int previous = -1;  // the stage whose wgmma group may still be reading it
    for (int slab = 0; slab < slabs; ++slab, advance()) {
      mbarrier_wait(&full[stage], phase);
      wgmma_fence();
      const unsigned char* const a_rows = a_stages + stage * kWgmmaStageBytesA + consumer * 64 * 128;
      const unsigned char* const b_rows = b_stages + stage * kWgmmaStageBytesB;
#pragma unroll
      for (int k16 = 0; k16 < kWgmmaBlockK / 16; ++k16) {
        // A: 8-row groups 1024 bytes apart, k16 steps 32 bytes along the swizzled row; B: k-rows of 64 columns,
        // the second 64 columns 8 KiB on (the leading offset), 8-row groups 1024 bytes apart, k16 = 16 rows.
        wgmma_m64n128k16<T, 1>(acc, smem_descriptor_sw128(a_rows + 32 * k16, 16, 1024),
                            smem_descriptor_sw128(b_rows + 16 * 128 * k16, kWgmmaHalfBytesB, 1024),
                            slab > 0 || k16 > 0);
      }
      wgmma_commit();
      wgmma_wait<1>();  // the previous slab's group is done: its stage goes back to the producer
      if (previous >= 0 && thread == 0) mbarrier_arrive(&empty[previous]);
      previous = stage;
    }
    wgmma_wait<0>();
    pin_registers(acc);  // read by the epilogue, after the wait
    if (previous >= 0 && thread == 0) mbarrier_arrive(&empty[previous]);

    if (thread == 0) tma_store_wait_read<0>();  // the last tile's store has read `out`
    named_barrier_sync(1 + consumer, 128);
    const int warp = thread / 32, g = (thread % 32) / 4, t = thread % 4;
#pragma unroll
    for (int v = 0; v < 64; v += 2) {  // accumulator map: row 16 warp + g (+8), column 8 (v / 4) + 2 t
      const int row = 16 * warp + g + 8 * ((v / 2) % 2), col = 8 * (v / 4) + 2 * t;
      const unsigned offset = (col / 64) * (64 * 128) + swizzle_128b(row * 128 + (col % 64) * 2);
      store_pair(reinterpret_cast<T*>(out + offset), acc[v], acc[v + 1]);
    }
    fence_proxy_async();  // the writes above, visible to the TMA store
    named_barrier_sync(1 + consumer, 128);
    if (thread == 0) {
      tma_store_3d(c_map, out, n0, m0, z);
      tma_store_3d(c_map, out + 64 * 128, n0 + 64, m0, z);
      tma_store_commit();
    }
  }
  if (thread == 0) tma_store_wait_read<0>();
#endif
}

}  // namespace gpuforge

#ifndef __CUDACC_RTC__
#include <cuda.h>
#include <cudaTypedefs.h>

#include "launchers.h"
#include "tensor_maps.h"

namespace gpuforge {

static bool rows_ok(const void* p, std::initializer_list<int64_t> multiples_of_8) {
  if (!aligned16(p)) return false;
  for (int64_t v : multiples_of_8)
    if (v % 8 != 0) return false;
  return true;
}

bool matmul_wgmma_applies(const void* a, const void* b, int64_t N, int64_t K, int64_t sa_z, int64_t sa_m,
                          int64_t sa_k, int64_t sb_z, int64_t sb_k, int64_t sb_n, DType dtype) {
  if (dtype == DType::Float32 || sa_k != 1 || sb_n != 1) return false;
  if (!rows_ok(a, {K, sa_z, sa_m}) || !rows_ok(b, {N, sb_z, sb_k})) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) return false;
  return major == 9 && minor == 0;  // sm_90a code runs on compute capability 9.0 only
}

cudaError_t launch_matmul_wgmma(const void* a, const void* b, void* c, int64_t M, int64_t N, int64_t K,
                                int64_t batch, int64_t sa_z, int64_t sa_m, int64_t sa_k, int64_t sb_z, int64_t sb_k,
                                int64_t sb_n, DType dtype, cudaStream_t stream) {
  if (M == 0 || N == 0 || batch == 0) return cudaSuccess;
  const bool applies = matmul_wgmma_applies(a, b, N, K, sa_z, sa_m, sa_k, sb_z, sb_k, sb_n, dtype);
  cudaGetLastError();  // a failed probe above must not be reported as this launch's error
  if (!applies || M > INT32_MAX || N > INT32_MAX || K > INT32_MAX) return cudaErrorNotSupported;
  if (K == 0) return cudaMemsetAsync(c, 0, M * N * batch * 2, stream);
  const auto encode = driver_tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  MatmulWgmmaMaps maps;
  if (encode_matmul_wgmma_maps(encode, maps, a, b, c, M, N, K, batch, sa_z, sa_m, sb_z, sb_k,
                               dtype == DType::BFloat16) != CUDA_SUCCESS)
    return cudaErrorInvalidValue;
  int device = 0, sms = 0;
  GF_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  GF_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const long long tiles = ((M + kWgmmaBlockM - 1) / kWgmmaBlockM) * ((N + kWgmmaBlockN - 1) / kWgmmaBlockN) * batch;
  const unsigned blocks = static_cast<unsigned>(tiles < sms ? tiles : sms);
  const auto launch = [&](auto kernel) -> cudaError_t {
    GF_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kWgmmaSharedBytes));
    kernel<<<blocks, kWgmmaThreads, kWgmmaSharedBytes, stream>>>(maps.a, maps.b, maps.c, int(M), int(N), int(K),
                                                                 int(batch), sa_z != 0, sb_z != 0);
    return cudaGetLastError();
  };
  return dtype == DType::BFloat16 ? launch(matmul_wgmma_kernel<__nv_bfloat16>) : launch(matmul_wgmma_kernel<__half>);
}

}  // namespace gpuforge
#endif
