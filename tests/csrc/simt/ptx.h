// The PTX instructions of csrc/'s tensor-core kernels, emulated on the SIMT emulator's fibers (simt.h).
//
// The test build (tests/csrc/simt_build.py) rewrites each `asm(...)` statement of the sources into a call of
// one function here, operand for operand; a shared-memory address operand written `smem_address(p)` is passed
// as the pointer p itself. An instruction the translator does not know fails the build, so nothing is emulated
// silently. Semantics follow the PTX ISA (sections on mma.sync m16n8k16, ldmatrix, cp.async):
//
//   mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 d, a, b, c    (warp-collective)
//     D (16x8) = A (16x16, row) x B (16x8, col) + C, fp32 accumulation. With g = lane / 4, t = lane % 4:
//     a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9];
//     b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]; c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
//     (a register holds two 16-bit values, the lower column / row in its low half).
//   ldmatrix.sync.aligned.m8n8.x{1,2,4}{,.trans}.shared.b16 {r...}, [addr]          (warp-collective)
//     lanes 8i .. 8i+7 give the addresses of rows 0..7 of matrix i; register i of lane l receives row l / 4,
//     columns 2 (l % 4) and 2 (l % 4) + 1 of matrix i (.trans: of its transpose).
//   cp.async.{ca,cg}.shared.global [dst], [src], size{, src_size}; commit_group; wait_group n
//     an asynchronous copy of `size` bytes (4, 8 or 16, aligned), of which the first src_size are read and the
//     rest written as zeros. A copy lands when a wait_group lets its group complete: wait_group n waits until
//     at most n of this thread's committed groups are pending; uncommitted copies join the next group. Here the
//     bytes move at that wait (or when the thread exits), not before: a kernel that reads shared memory before
//     its wait reads what was there before, as the real race would allow.
//
// The fragment maps are the functions of fragments.h; tests/csrc/test_ptx_layouts.py checks them for every lane
// and register against CuTe's MMA and copy traits.
#pragma once

#include <cstring>
#include <stdexcept>
#include <utility>
#include <vector>

#include "fragments.h"
#include "simt.h"

namespace simt {

struct F16 {
  static float to_float(unsigned short bits) { return __half2float(__half{bits}); }
};
struct Bf16 {
  static float to_float(unsigned short bits) { return __bfloat162float(__nv_bfloat16{bits}); }
};

inline unsigned short half_bits(unsigned reg, int half) { return static_cast<unsigned short>(reg >> (16 * half)); }

// Runs `compute(lanes)` on every lane of the warp once each lane has stored its operands with `store(mine)`;
// `lanes` points at the 32 lanes' operand records.
template <typename Operands, typename Store, typename Compute>
void warp_collective(Store store, Compute compute) {
  static_assert(sizeof(Operands) <= sizeof(Block::Wide));
  Fiber& me = self();
  auto* wide = g_block->wide.data() + me.warp * 32;
  Operands mine{};
  store(mine);
  std::memcpy(&wide[me.lane], &mine, sizeof(Operands));
  wait(g_block->warps[me.warp]);
  Operands lanes[32];
  for (int l = 0; l < 32; ++l) std::memcpy(&lanes[l], &wide[l], sizeof(Operands));
  wait(g_block->warps[me.warp]);
  compute(lanes);
}

struct MmaOperands {
  unsigned a[4], b[2];
};

// d = a x b + c for this lane's four accumulators; every product of two 16-bit values is exact in float and
// the 16 products of a dot are summed in double, then added to c and rounded once to float.
template <typename In>
void mma_m16n8k16(float& d0, float& d1, float& d2, float& d3, unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                  unsigned b0, unsigned b1, float c0, float c1, float c2, float c3) {
  const float c[4] = {c0, c1, c2, c3};
  float d[4];
  warp_collective<MmaOperands>(
      [&](MmaOperands& mine) { mine = {{a0, a1, a2, a3}, {b0, b1}}; },
      [&](const MmaOperands* lanes) {
        float A[16][16], B[16][8];
        for (int l = 0; l < 32; ++l)
          for (int reg = 0; reg < 4; ++reg)
            for (int half = 0; half < 2; ++half) {
              const Coord ac = a_element(l, reg, half);
              A[ac.row][ac.col] = In::to_float(half_bits(lanes[l].a[reg], half));
              if (reg < 2) {
                const Coord bc = b_element(l, reg, half);
                B[bc.row][bc.col] = In::to_float(half_bits(lanes[l].b[reg], half));
              }
            }
        const int lane = self().lane;
        for (int i = 0; i < 4; ++i) {
          const Coord cc = c_element(lane, i);
          double dot = 0;
          for (int k = 0; k < 16; ++k) dot += double(A[cc.row][k]) * B[k][cc.col];
          d[i] = static_cast<float>(dot + c[i]);
        }
      });
  d0 = d[0], d1 = d[1], d2 = d[2], d3 = d[3];
}

struct LdmatrixOperands {
  const unsigned char* address;
};

// Register i of this lane from matrix i, rows given by lanes 8i .. 8i+7 (16-byte rows of 8 b16 values).
template <int kMatrices, bool kTrans>
void ldmatrix(unsigned* regs, const void* address) {
  static_assert(kMatrices == 1 || kMatrices == 2 || kMatrices == 4);
  warp_collective<LdmatrixOperands>(
      [&](LdmatrixOperands& mine) {
        if ((reinterpret_cast<uintptr_t>(address) & 15u) != 0)
          throw std::invalid_argument("simt: ldmatrix row address not 16-byte aligned");
        mine.address = static_cast<const unsigned char*>(address);
      },
      [&](const LdmatrixOperands* lanes) {
        const int lane = self().lane;
        for (int reg = 0; reg < kMatrices; ++reg) {
          unsigned value = 0;
          for (int half = 0; half < 2; ++half) {
            const LdmatrixCoord e = ldmatrix_element(lane, reg, half, kTrans);
            unsigned short bits;
            std::memcpy(&bits, lanes[8 * e.matrix + e.row].address + 2 * e.col, 2);
            value |= static_cast<unsigned>(bits) << (16 * half);
          }
          regs[reg] = value;
        }
      });
}
template <int kMatrices, bool kTrans>
void ldmatrix(unsigned& r0, const void* address) {
  static_assert(kMatrices == 1);
  ldmatrix<1, kTrans>(&r0, address);
}
template <int kMatrices, bool kTrans>
void ldmatrix(unsigned& r0, unsigned& r1, const void* address) {
  static_assert(kMatrices == 2);
  unsigned r[2];
  ldmatrix<2, kTrans>(r, address);
  r0 = r[0], r1 = r[1];
}
template <int kMatrices, bool kTrans>
void ldmatrix(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const void* address) {
  static_assert(kMatrices == 4);
  unsigned r[4];
  ldmatrix<4, kTrans>(r, address);
  r0 = r[0], r1 = r[1], r2 = r[2], r3 = r[3];
}

inline void cp_async(void* dst, const void* src, int size, int src_size) {
  if (size != 4 && size != 8 && size != 16) throw std::invalid_argument("simt: cp.async size must be 4, 8 or 16");
  if (src_size < 0 || src_size > size) throw std::invalid_argument("simt: cp.async src_size outside 0..size");
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % size != 0)
    throw std::invalid_argument("simt: cp.async addresses must be aligned to the copy size");
  self().cp_open.push_back({static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), size,
                            src_size});
}
inline void cp_async_commit() {
  Fiber& me = self();
  me.cp_groups.push_back(std::move(me.cp_open));
  me.cp_open.clear();
}
inline void cp_async_wait(int pending) {
  Fiber& me = self();
  while (static_cast<int>(me.cp_groups.size()) > pending) {
    land(me.cp_groups.front());
    me.cp_groups.erase(me.cp_groups.begin());
  }
}

}  // namespace simt
