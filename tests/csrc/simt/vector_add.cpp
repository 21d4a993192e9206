// C entry point that runs csrc/vector_add.cu's kernels on the CPU through the SIMT emulator (simt.h), for
// tests/csrc/test_vector_add_simt.py. The grid and the choice of kernel mirror launch_vector_add.
#include <algorithm>

#include "driver.h"

#include "vector_add.cu"

// out = a + b over n elements: the 16-byte kernel when every pointer is 16-byte aligned, else the scalar one.
// max_blocks caps the grid (the launcher's cap is 2^30) so that a test can run the grid-stride loops.
extern "C" int gf_simt_vector_add(int dtype, const void* a, const void* b, void* out, long long n,
                                  long long max_blocks) {
  using namespace simt_driver;
  if (n == 0) return 0;
  constexpr int kThreads = 256;  // kVectorAddThreads
  const bool vectorized = aligned16(a) && aligned16(b) && aligned16(out);
  return with_dtype(dtype, [&](auto t) {
    using T = decltype(t);
    const long long per_thread = vectorized ? 16 / sizeof(T) : 1;
    const long long blocks = std::min<long long>(cdiv(cdiv(n, per_thread), kThreads), max_blocks);
    const dim3 grid{static_cast<unsigned>(blocks), 1, 1}, block{kThreads, 1, 1};
    auto* pa = static_cast<const T*>(a);
    auto* pb = static_cast<const T*>(b);
    auto* po = static_cast<T*>(out);
    if (vectorized)
      simt::launch(grid, block, 0, gpuforge::vector_add_vec16_kernel<T>, pa, pb, po, n);
    else
      simt::launch(grid, block, 0, gpuforge::vector_add_scalar_kernel<T>, pa, pb, po, n);
    return 0;
  });
}
