// Probe kernels for the emulated PTX of ptx.h, written as a CUDA kernel would write them (inline PTX, which the
// test build translates), for tests/csrc/test_ptx_instructions.py: ldmatrix x1/x2/x4 with and without .trans,
// and cp.async of 4, 8 and 16 bytes with partial sources, committed in groups and waited for one by one.
#include "driver.h"

#include "mma.cuh"  // smem_address, as the kernels take shared-memory addresses

namespace {

using gpuforge::smem_address;

// One warp: `matrices` 8x8 b16 matrices, rows of 16 bytes at row pitch `pitch` halves; out[lane * 4 + r] =
// register r of lane `lane` after ldmatrix.x{matrices}{.trans}.
template <int kMatrices, bool kTrans>
__global__ void ldmatrix_kernel(const unsigned short* in, int pitch, unsigned* out) {
  __shared__ __align__(16) unsigned short tile[4 * 8 * 24];
  const int lane = threadIdx.x;
  for (int i = lane; i < kMatrices * 8 * pitch; i += 32) tile[i] = in[i];
  __syncwarp();
  const unsigned short* row = tile + (lane % (8 * kMatrices)) * pitch;  // lanes 8i..8i+7: rows of matrix i
  unsigned r[4] = {0, 0, 0, 0};
  if constexpr (kMatrices == 1 && !kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_address(row)));
  if constexpr (kMatrices == 1 && kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n"
                 : "=r"(r[0]) : "r"(smem_address(row)));
  if constexpr (kMatrices == 2 && !kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_address(row)));
  if constexpr (kMatrices == 2 && kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1]) : "r"(smem_address(row)));
  if constexpr (kMatrices == 4 && !kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(row)));
  if constexpr (kMatrices == 4 && kTrans)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_address(row)));
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// One warp; each lane copies two 16-byte slots of shared memory, A then B, from `src`, in two groups:
//   slot A: cp.async.ca of `size` bytes with src_size = a_bytes (the rest zero-filled), committed;
//   slot B: cp.async.cg of 16 bytes with src_size = 16, committed.
// out receives shared memory at four moments: before any wait, after wait_group 1, after wait_group 0.
// Shared memory starts as 0xAB bytes, so an unlanded copy shows.
__global__ void cp_async_kernel(const unsigned char* src, int size, int a_bytes, unsigned char* out) {
  __shared__ __align__(16) unsigned char slots[32][2][16];
  const int lane = threadIdx.x;
  for (int i = 0; i < 32; ++i) slots[lane][i / 16][i % 16] = 0xAB;
  unsigned char* a = slots[lane][0];
  unsigned char* b = slots[lane][1];
  const unsigned char* from = src + lane * 32;
  if (size == 4)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_address(a)), "l"(from), "r"(a_bytes));
  if (size == 8)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(smem_address(a)), "l"(from), "r"(a_bytes));
  if (size == 16)
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(a)), "l"(from),
                 "r"(a_bytes));
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(b)), "l"(from + 16), "r"(16));
  asm volatile("cp.async.commit_group;\n" ::);
  auto snapshot = [&](int moment) {
    for (int i = 0; i < 32; ++i) out[(moment * 32 + lane) * 32 + i] = slots[lane][i / 16][i % 16];
  };
  snapshot(0);
  asm volatile("cp.async.wait_group %0;\n" ::"n"(1));
  snapshot(1);
  asm volatile("cp.async.wait_group %0;\n" ::"n"(0));
  snapshot(2);
}

}  // namespace

extern "C" int gf_simt_ldmatrix(int matrices, int trans, const unsigned short* in, int pitch, unsigned* out) {
  auto run = [&](auto kernel) {
    simt::launch(dim3{1, 1, 1}, dim3{32, 1, 1}, 0, kernel, in, pitch, out);
    return 0;
  };
  if (matrices == 1) return trans ? run(ldmatrix_kernel<1, true>) : run(ldmatrix_kernel<1, false>);
  if (matrices == 2) return trans ? run(ldmatrix_kernel<2, true>) : run(ldmatrix_kernel<2, false>);
  if (matrices == 4) return trans ? run(ldmatrix_kernel<4, true>) : run(ldmatrix_kernel<4, false>);
  return 1;
}

extern "C" int gf_simt_cp_async(const unsigned char* src, int size, int a_bytes, unsigned char* out) {
  simt::launch(dim3{1, 1, 1}, dim3{32, 1, 1}, 0, cp_async_kernel, src, size, a_bytes, out);
  return 0;
}
