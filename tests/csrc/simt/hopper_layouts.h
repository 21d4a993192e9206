// Where Hopper's asynchronous tensor-core and copy instructions put each element, as pure functions of their
// operands, per the PTX ISA (sections on wgmma matrix descriptors, canonical layouts and the tensor-map
// swizzle modes): used by the emulation in hopper.h and checked against CuTe's GMMA descriptors, GMMA layout
// atoms and accumulator layouts (tests/csrc/simt/cute_hopper_layouts.cpp). Dependency-free, so that program can
// include it beside CuTe's headers.
#pragma once

#include <cstdint>
#include <stdexcept>

namespace simt {

// A shared-memory matrix descriptor (wgmma.mma_async's 64-bit a-desc / b-desc operands). Byte offsets are
// stored in 16-byte units: start address bits 0-13, leading byte offset 16-29, stride byte offset 32-45,
// base offset 49-51, layout (swizzle) 62-63: 0 none (interleaved 8x16-byte core matrices), 1 128 B, 2 64 B,
// 3 32 B.
struct SmemDescriptor {
  unsigned start, leading, stride, base_offset, layout;
};
inline SmemDescriptor decode_descriptor(uint64_t desc) {
  return {static_cast<unsigned>(desc & 0x3fff) << 4, static_cast<unsigned>((desc >> 16) & 0x3fff) << 4,
          static_cast<unsigned>((desc >> 32) & 0x3fff) << 4, static_cast<unsigned>((desc >> 49) & 7),
          static_cast<unsigned>(desc >> 62)};
}

// The swizzle span in 16-byte chunks of a descriptor layout: 1 (none), 2 (32 B), 4 (64 B), 8 (128 B).
inline unsigned swizzle_chunks(unsigned layout) {
  static constexpr unsigned kChunks[4] = {1, 8, 4, 2};
  return kChunks[layout & 3];
}

// Swizzle<B, 4, 3> on a shared-memory byte address, B = log2(chunks): the 16-byte chunk index (bits 4..4+B)
// XORed with the 128-byte row index within the 8-row pattern (bits 7..7+B). chunks == 1: no swizzle.
inline unsigned swizzle_address(unsigned address, unsigned chunks) {
  const unsigned mask = chunks - 1;
  return address ^ (((address >> 7) & mask) << 4);
}

// The shared-memory byte address of element (mn, k) of a wgmma operand tile (mn: the row of A / column of B,
// 0..63 or 0..N-1; k: 0..15 for 16-bit types) described by `desc`, for elements of `elem_bytes` bytes, in
// the canonical layouts (T = 16 / elem_bytes elements per 16-byte chunk, W = swizzle chunks):
//   K-major,  swizzled:  ((8, m), (T, 2)) : ((W*T, SBO), (1, T))     rows of W chunks, 8-row groups at SBO
//   K-major,  none:      ((8, m), (T, 2)) : ((T, SBO), (1, LBO))     8x16-byte core matrices, k halves at LBO
//   MN-major, swizzled:  ((T, W, m), (8, k)) : ((1, T, LBO), (W*T, SBO))  W-chunk runs along MN, atoms at LBO
//   MN-major, none:      ((T, 1, m), (8, k)) : ((1, T, SBO), (T, LBO))
// (element strides, as CuTe writes them), then the swizzle. A non-zero base offset is not emulated.
inline unsigned operand_address(uint64_t desc, bool mn_major, int elem_bytes, int mn, int k) {
  const SmemDescriptor d = decode_descriptor(desc);
  if (d.base_offset != 0) throw std::invalid_argument("simt: wgmma descriptors with a base offset are not emulated");
  const unsigned w = swizzle_chunks(d.layout), t = 16u / elem_bytes;
  const unsigned umn = static_cast<unsigned>(mn), uk = static_cast<unsigned>(k);
  unsigned offset;
  if (!mn_major) {
    offset = (umn / 8) * d.stride + (w == 1 ? (umn % 8) * 16 + (uk / t) * d.leading + (uk % t) * elem_bytes
                                            : (umn % 8) * 16 * w + uk * elem_bytes);
  } else {
    offset = (w == 1 ? (umn % t) * elem_bytes + (umn / t) * d.stride + (uk % 8) * 16 + (uk / 8) * d.leading
                     : (umn / (t * w)) * d.leading + (umn % (t * w)) * elem_bytes + (uk % 8) * 16 * w +
                           (uk / 8) * d.stride);
  }
  return swizzle_address(d.start + offset, w);
}

// (row, column) of accumulator `value` of thread `thread` (0..127) of a warpgroup's m64nN fp32 wgmma result:
// warp w holds rows 16w..16w+15 as mma.sync's 16x8 C fragment, repeated along N every 8 columns.
struct AccumulatorCoord {
  int row, col;
};
inline AccumulatorCoord accumulator_element(int thread, int value) {
  const int warp = thread / 32, g = (thread % 32) / 4, t = thread % 4;
  return {16 * warp + g + 8 * ((value / 2) % 2), 8 * (value / 4) + 2 * t + value % 2};
}

// (row, k) of element `index` (0..7: register index / 2, the low half first) of thread `thread`'s A fragment of a
// 16-bit wgmma m64nNk16 that reads A from registers: warp w holds rows 16w..16w+15 as mma.sync's 16x16 A
// fragment, so an accumulator pair (values 8j + index of a result) converted to 16 bits is A's k16 block j.
inline AccumulatorCoord register_a_element(int thread, int index) {
  const int warp = thread / 32, g = (thread % 32) / 4, t = thread % 4;
  return {16 * warp + g + 8 * ((index / 2) % 2), 2 * t + index % 2 + 8 * (index / 4)};
}

// The shared-memory byte offset (from the box's start) at which a tensor-map copy puts element `index` (in
// row-major order over the box, innermost dimension first) of a box whose innermost dimension is
// `inner_bytes` long, under a swizzle of `swizzle_bytes` (0, 32, 64 or 128): the box is packed densely and the
// swizzle applied to the shared-memory address, so `start` must be aligned to the swizzle's 8-row pattern.
inline unsigned box_address(unsigned start, unsigned element_offset, unsigned swizzle_bytes) {
  return swizzle_address(start + element_offset, swizzle_bytes ? swizzle_bytes / 16 : 1);
}

}  // namespace simt
