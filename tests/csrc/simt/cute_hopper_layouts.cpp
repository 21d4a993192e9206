// Checks the SIMT emulator's Hopper address maps (hopper_layouts.h) against a source nobody here wrote: CuTe's
// SM90 GMMA code from the nvidia-cutlass wheel, evaluated on the host.
//  - wgmma descriptors: for every GMMA layout atom (K- and MN-major; interleaved, 32, 64 and 128 B swizzle) of a
//    16-bit type, tiled over a shared-memory tile and sliced into its k16 blocks as a kernel does, CuTe's
//    make_gmma_desc builds the descriptor; the emulator's decoding of it must give, for every element of the
//    block, the address CuTe's swizzled layout gives.
//  - accumulators: the emulator's (thread, value) -> (row, column) map equals CuTe's CLayout_64xN for N = 8 ..
//    256, and its A-from-registers fragment map CuTe's ALayout_64x16.
//  - tensor-map swizzle: a box that a copy with the 32/64/128 B swizzle writes is read back through the GMMA
//    atom of the same swizzle (K-major: box rows are MN rows; MN-major: box rows are k), as CUTLASS pairs them.
// Prints each mismatch and the number of comparisons; exits 1 on any mismatch. Built and run by
// tests/csrc/test_ptx_layouts.py.
#include <cstdint>
#include <cstdio>

// CuTe turns a shared-memory pointer into a 32-bit shared address with __cvta_generic_to_shared; on the host
// that is the offset into this program's stand-in for a block's shared memory.
alignas(1024) static unsigned char g_shared[64 * 1024];
static inline uint64_t __cvta_generic_to_shared(const void* p) {
  return static_cast<uint64_t>(static_cast<const unsigned char*>(p) - g_shared);
}
#define CUTE_CVTA_GENERIC_TO_SHARED_ACTIVATED 1

#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>

#include "hopper_layouts.h"

namespace {

using namespace cute;
using Element = cute::bfloat16_t;

int mismatches = 0, checks = 0;

void expect(bool ok, const char* what, int a, int b, long theirs, long ours) {
  ++checks;
  if (!ok && ++mismatches <= 20)
    std::printf("MISMATCH %s (%d, %d): CuTe %ld, emulator %ld\n", what, a, b, theirs, ours);
}

// The atom tiled over an (MN, 64) tile (K-major) or (MN, 64) tile (MN-major), sliced into four k16 blocks.
template <GMMA::Major kMajor, class Atom, int kMN>
void check_descriptor(const char* name) {
  auto layout = tile_to_shape(Atom{}, Shape<Int<kMN>, _64>{});
  Tensor tile = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(g_shared)), layout);
  for (int block = 0; block < 4; ++block) {
    Tensor slice = local_tile(tile, Shape<Int<kMN>, _16>{}, make_coord(0, block));
    const uint64_t desc = SM90::GMMA::make_gmma_desc<kMajor>(slice);
    for (int mn = 0; mn < kMN; ++mn)
      for (int k = 0; k < 16; ++k) {
        const long theirs = static_cast<long>(__cvta_generic_to_shared(raw_pointer_cast(&slice(mn, k))));
        const long ours = simt::operand_address(desc, kMajor == GMMA::Major::MN, sizeof(Element), mn, k);
        expect(theirs == ours, name, mn, 16 * block + k, theirs, ours);
      }
  }
}

template <int kN>
void check_accumulators() {
  const auto c = SM90::GMMA::CLayout_64xN<kN>{};
  for (int thread = 0; thread < 128; ++thread)
    for (int value = 0; value < kN / 2; ++value) {
      const int index = c(thread, value);  // column-major over (64, N)
      const simt::AccumulatorCoord e = simt::accumulator_element(thread, value);
      expect(index == e.row + 64 * e.col, "accumulator", thread, value, index, e.row + 64 * e.col);
    }
}

// A register-sourced wgmma's A fragment: the emulator's (thread, element) -> (row, k) map equals CuTe's
// ALayout_64x16 (16-bit types).
void check_register_a() {
  const auto a = SM90::GMMA::ALayout_64x16{};
  for (int thread = 0; thread < 128; ++thread)
    for (int index = 0; index < 8; ++index) {
      const int theirs = a(thread, index);  // column-major over (64, 16)
      const simt::AccumulatorCoord e = simt::register_a_element(thread, index);
      expect(theirs == e.row + 64 * e.col, "register A", thread, index, theirs, e.row + 64 * e.col);
    }
}

// A copy box of `rows` rows of kSwizzle bytes (the swizzle span), element (row, col) of the box (col innermost)
// landing at box_address(...); CuTe's atom must hold that element at (row, col) (K-major) or (col, row)
// (MN-major).
template <GMMA::Major kMajor, class Atom, int kSwizzle>
void check_box(const char* name) {
  constexpr int kInner = kSwizzle / static_cast<int>(sizeof(Element)), kRows = 16;
  using Shape_ = std::conditional_t<kMajor == GMMA::Major::K, Shape<Int<kRows>, Int<kInner>>,
                                    Shape<Int<kInner>, Int<kRows>>>;
  Tensor tile = make_tensor(make_smem_ptr(reinterpret_cast<Element*>(g_shared)), tile_to_shape(Atom{}, Shape_{}));
  for (int row = 0; row < kRows; ++row)
    for (int col = 0; col < kInner; ++col) {
      const Element* at = kMajor == GMMA::Major::K ? &tile(row, col) : &tile(col, row);
      const long theirs = static_cast<long>(__cvta_generic_to_shared(raw_pointer_cast(at)));
      const long ours = simt::box_address(0, (row * kInner + col) * sizeof(Element), kSwizzle);
      expect(theirs == ours, name, row, col, theirs, ours);
    }
}

}  // namespace

int main() {
  using namespace cute::SM90::GMMA;
  check_descriptor<Major::K, Layout_K_INTER_Atom<Element>, 64>("K-major interleaved");
  check_descriptor<Major::K, Layout_K_SW32_Atom<Element>, 64>("K-major 32B");
  check_descriptor<Major::K, Layout_K_SW64_Atom<Element>, 64>("K-major 64B");
  check_descriptor<Major::K, Layout_K_SW128_Atom<Element>, 64>("K-major 128B");
  check_descriptor<Major::K, Layout_K_SW128_Atom<Element>, 128>("K-major 128B, N 128");
  check_descriptor<Major::MN, Layout_MN_INTER_Atom<Element>, 64>("MN-major interleaved");
  check_descriptor<Major::MN, Layout_MN_SW32_Atom<Element>, 64>("MN-major 32B");
  check_descriptor<Major::MN, Layout_MN_SW64_Atom<Element>, 64>("MN-major 64B");
  check_descriptor<Major::MN, Layout_MN_SW128_Atom<Element>, 64>("MN-major 128B");
  check_descriptor<Major::MN, Layout_MN_SW128_Atom<Element>, 128>("MN-major 128B, N 128");
  check_descriptor<Major::MN, Layout_MN_SW64_Atom<Element>, 128>("MN-major 64B, N 128");
  check_accumulators<8>();
  check_accumulators<64>();
  check_accumulators<128>();
  check_accumulators<256>();
  check_register_a();
  check_box<Major::K, Layout_K_SW32_Atom<Element>, 32>("box 32B, K-major");
  check_box<Major::K, Layout_K_SW64_Atom<Element>, 64>("box 64B, K-major");
  check_box<Major::K, Layout_K_SW128_Atom<Element>, 128>("box 128B, K-major");
  check_box<Major::MN, Layout_MN_SW32_Atom<Element>, 32>("box 32B, MN-major");
  check_box<Major::MN, Layout_MN_SW64_Atom<Element>, 64>("box 64B, MN-major");
  check_box<Major::MN, Layout_MN_SW128_Atom<Element>, 128>("box 128B, MN-major");
  std::printf("%d checks, %d mismatches\n", checks, mismatches);
  return mismatches ? 1 : 0;
}
