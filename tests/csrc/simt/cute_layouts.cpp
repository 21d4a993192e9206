// Checks the SIMT emulator's tensor-core fragment maps (fragments.h) against a source nobody here wrote: CuTe's
// MMA_Traits (SM80 m16n8k16, fp16 and bf16) and Copy_Traits (SM75 ldmatrix x1/x2/x4, plain and transposed),
// from the nvidia-cutlass wheel's headers, evaluated on the host. Every lane, register and value is compared;
// prints each mismatch and the number of comparisons, exits 1 on any mismatch. Built and run by
// tests/csrc/test_ptx_layouts.py.
//
// CuTe's conventions: an MMA layout maps (thread, value) to a linear index of the operand, column-major over
// (M, K) for A, (N, K) for B, (M, N) for C. A copy layout maps (thread, value) to a bit index of the data moved:
// for ldmatrix the source is X matrices of 8 rows x 128 bits (bit = matrix*1024 + row*128 + col*16 + b), and
// destination value v of a thread is bit v % 16 of 16-bit half (v / 16) % 2 of register v / 32.
#include <cstdio>

#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>

#include "fragments.h"

namespace {

int mismatches = 0, checks = 0;

void expect(bool ok, const char* what, int lane, int value, int theirs, int ours) {
  ++checks;
  if (!ok) {
    ++mismatches;
    std::printf("MISMATCH %s lane %d value %d: CuTe %d, emulator %d\n", what, lane, value, theirs, ours);
  }
}

template <class Op>
void check_mma(const char* name) {
  using Traits = cute::MMA_Traits<Op>;
  const auto a = typename Traits::ALayout{};
  const auto b = typename Traits::BLayout{};
  const auto c = typename Traits::CLayout{};
  for (int lane = 0; lane < 32; ++lane) {
    for (int v = 0; v < 8; ++v) {  // A: registers 0..3, two halves each
      const simt::Coord e = simt::a_element(lane, v / 2, v % 2);
      expect(int(a(lane, v)) == e.row + 16 * e.col, name, lane, v, int(a(lane, v)), e.row + 16 * e.col);
    }
    for (int v = 0; v < 4; ++v) {  // B: registers 0..1; (k, n) -> n + 8 k
      const simt::Coord e = simt::b_element(lane, v / 2, v % 2);
      expect(int(b(lane, v)) == e.col + 8 * e.row, name, lane, 8 + v, int(b(lane, v)), e.col + 8 * e.row);
    }
    for (int v = 0; v < 4; ++v) {  // C/D: four floats; (m, n) -> m + 16 n
      const simt::Coord e = simt::c_element(lane, v);
      expect(int(c(lane, v)) == e.row + 16 * e.col, name, lane, 12 + v, int(c(lane, v)), e.row + 16 * e.col);
    }
  }
}

template <class Op, int kMatrices, bool kTrans>
void check_ldmatrix(const char* name) {
  using Traits = cute::Copy_Traits<Op>;
  const auto src = typename Traits::SrcLayout{};
  const auto dst = typename Traits::DstLayout{};
  for (int lane = 0; lane < 8 * kMatrices; ++lane)  // lane l gives row l % 8 of matrix l / 8: bits l*128 ..
    expect(int(src(lane, 0)) == lane * 128, name, lane, -1, int(src(lane, 0)), lane * 128);
  for (int lane = 0; lane < 32; ++lane)
    for (int v = 0; v < 32 * kMatrices; ++v) {
      const simt::LdmatrixCoord e = simt::ldmatrix_element(lane, v / 32, (v / 16) % 2, kTrans);
      const int ours = e.matrix * 1024 + e.row * 128 + e.col * 16 + v % 16;
      expect(int(dst(lane, v)) == ours, name, lane, v, int(dst(lane, v)), ours);
    }
}

}  // namespace

int main() {
  check_mma<cute::SM80_16x8x16_F32F16F16F32_TN>("mma m16n8k16 f16");
  check_mma<cute::SM80_16x8x16_F32BF16BF16F32_TN>("mma m16n8k16 bf16");
  check_ldmatrix<cute::SM75_U32x1_LDSM_N, 1, false>("ldmatrix.x1");
  check_ldmatrix<cute::SM75_U32x2_LDSM_N, 2, false>("ldmatrix.x2");
  check_ldmatrix<cute::SM75_U32x4_LDSM_N, 4, false>("ldmatrix.x4");
  check_ldmatrix<cute::SM75_U16x2_LDSM_T, 1, true>("ldmatrix.x1.trans");
  check_ldmatrix<cute::SM75_U16x4_LDSM_T, 2, true>("ldmatrix.x2.trans");
  check_ldmatrix<cute::SM75_U16x8_LDSM_T, 4, true>("ldmatrix.x4.trans");
  std::printf("%d checks, %d mismatches\n", checks, mismatches);
  return mismatches ? 1 : 0;
}
