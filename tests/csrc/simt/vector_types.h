// Host stand-in for CUDA's vector_types.h, for the SIMT emulator (simt.h): the vector types csrc/ uses, with
// CUDA's sizes and alignments (a uint4 is one 16-byte load).
#pragma once

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
