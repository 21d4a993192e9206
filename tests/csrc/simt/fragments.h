// Where each value of a warp's tensor-core fragments sits in its matrix: the per-lane maps of the PTX ISA for
// mma.sync.m16n8k16 with 16-bit inputs and for ldmatrix.m8n8.b16, used by the emulation in ptx.h and checked
// for all 32 lanes against CuTe's MMA_Traits / Copy_Traits layouts (tests/csrc/simt/cute_layouts.cpp).
// Dependency-free, so that program can include it beside CuTe's headers.
#pragma once

namespace simt {

// (row, column) of the two 16-bit values of register `reg` of lane `lane`, value `half` (0: low, 1: high).
struct Coord {
  int row, col;
};
inline Coord a_element(int lane, int reg, int half) {  // A 16x16
  const int g = lane / 4, t = lane % 4;
  return {g + 8 * (reg % 2), 2 * t + half + 8 * (reg / 2)};
}
inline Coord b_element(int lane, int reg, int half) {  // B 16x8: (k, n)
  const int g = lane / 4, t = lane % 4;
  return {2 * t + half + 8 * reg, g};
}
inline Coord c_element(int lane, int index) {  // C/D 16x8: index 0..3 of the four floats
  const int g = lane / 4, t = lane % 4;
  return {g + 8 * (index / 2), 2 * t + index % 2};
}
// ldmatrix: (matrix, row, column) of value `half` of register `reg` of lane `lane`, before any transpose.
struct LdmatrixCoord {
  int matrix, row, col;
};
inline LdmatrixCoord ldmatrix_element(int lane, int reg, int half, bool trans) {
  const int r = lane / 4, c = 2 * (lane % 4) + half;
  return trans ? LdmatrixCoord{reg, c, r} : LdmatrixCoord{reg, r, c};
}

}  // namespace simt
