// Hopper's (sm_90a) asynchronous PTX, emulated on the SIMT emulator's fibers (simt.h), for csrc/'s wgmma + TMA
// kernels. The test build (tests/csrc/simt_build.py) rewrites each `asm(...)` statement into one call here,
// operand for operand; a shared-memory operand written `smem_address(p)` is passed as the pointer p. Semantics
// follow the PTX ISA; the address maps are those of hopper_layouts.h, checked against CuTe.
//
//   mbarrier.init / arrive / arrive.expect_tx / try_wait.parity (shared::cta, b64)
//     a barrier's phase completes when its pending arrivals (reset to the init count) and its transaction
//     bytes (raised by expect_tx, lowered by the copies it tracks) are both zero. try_wait.parity p is true
//     once the phase of parity p has completed (the current phase's parity differs from p). A failed wait
//     lets the other threads run; a wait that fails a million times with nothing changing is a deadlock and
//     stops the launch with an error.
//   cp.async.bulk.tensor.{2,3,4}d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [dst], [map, {c}], [bar]
//     one box of the tensor map at coordinates c (innermost first) into shared memory, out-of-bounds elements
//     filled with zeros (or NaN, as the map says), swizzled as the map says. The bytes land when a thread
//     waits on `bar` (not before: a kernel that reads the box before its wait reads the old bytes), and the
//     whole box's bytes count towards the barrier's transaction, as on the GPU.
//   cp.async.bulk.tensor.{2,3,4}d.global.shared::cta.tile.bulk_group [map, {c}], [src]; commit_group;
//     wait_group[.read] n
//     the box from shared memory to global memory, out-of-bounds elements not written; it reads shared memory
//     when a wait lets its group complete (or when the thread exits).
//   wgmma.fence / commit_group / wait_group n (warpgroup-collective)
//   wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}.{f16,bf16} {d}, a-desc, b-desc, scale-d, 1, 1, tA, tB
//     D (64xN, fp32, the accumulator map of hopper_layouts.h) = A (64x16) x B (16xN) + (scale-d ? D : 0), both
//     operands read from shared memory through their descriptors (tA / tB: MN-major). Each thread's part is
//     queued when the warpgroup issues it and computed when a wait_group lets its group complete: shared
//     memory is read then, and the accumulators written then, so a kernel that reads them, or overwrites its
//     operands, before the wait sees what a GPU could show. Products are exact, sums in double, one rounding.
//   wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}.{f16,bf16} {d}, {a0, a1, a2, a3}, b-desc, scale-d, 1, 1, tB
//     the same with A from registers (hopper_layouts.h's register_a_element, checked against CuTe's
//     ALayout_64x16), read when the group completes too.
//   setmaxnreg.{inc,dec}.sync.aligned.u32 n: checks 24 <= n <= 256, n a multiple of 8; no other effect.
//   fence.proxy.async[.shared::cta], fence.mbarrier_init.release.cluster: no effect (one memory, one order).
//   bar.sync id, count: a named barrier of `count` threads.
// Host side: cuTensorMapEncodeTiled (declared in this folder's cuda.h) checks the driver's documented limits
// and writes a TensorMapRecord into the CUtensorMap.
#pragma once

#include <array>
#include <memory>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cuda.h"
#include "hopper_layouts.h"
#include "ptx.h"
#include "simt.h"

#define __grid_constant__

namespace simt {

inline Mbarrier& mbarrier_at(const void* bar) {
  auto it = g_block->mbarriers.find(bar);
  if (it == g_block->mbarriers.end()) throw std::invalid_argument("simt: an mbarrier used before mbarrier.init");
  return it->second;
}

inline void mbarrier_complete_if_done(Mbarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.expected;
  }
  g_block->idle_waits = 0;
}

inline void mbarrier_init(void* bar, unsigned count) {
  if (reinterpret_cast<uintptr_t>(bar) % 8 != 0) throw std::invalid_argument("simt: mbarrier not 8-byte aligned");
  if (count < 1 || count >= (1u << 20)) throw std::invalid_argument("simt: mbarrier.init count outside 1..2^20-1");
  __cvta_generic_to_shared(bar);  // must lie in shared memory
  Mbarrier& b = g_block->mbarriers[bar];
  b = Mbarrier{};
  b.expected = b.pending = static_cast<int>(count);
}

inline void mbarrier_arrive(void* bar) {
  Mbarrier& b = mbarrier_at(bar);
  if (b.pending == 0) throw std::logic_error("simt: mbarrier arrival beyond its expected count");
  --b.pending;
  mbarrier_complete_if_done(b);
}

inline void mbarrier_arrive_expect_tx(void* bar, unsigned bytes) {
  mbarrier_at(bar).tx += bytes;
  mbarrier_arrive(bar);
}

inline unsigned mbarrier_try_wait_parity(void* bar, unsigned parity) {
  Mbarrier& b = mbarrier_at(bar);
  for (auto& copy : b.copies) b.tx -= copy();
  if (!b.copies.empty()) {
    b.copies.clear();
    mbarrier_complete_if_done(b);
  }
  if (static_cast<unsigned>(b.phase & 1) != (parity & 1)) return 1;
  if (++g_block->idle_waits > 1000000)
    throw std::runtime_error("simt: deadlock: an mbarrier wait never completes (no thread can make progress)");
  yield();
  return 0;
}

// What cuTensorMapEncodeTiled stores in the 128-byte map (tests/csrc/simt/cuda.h).
struct TensorMapRecord {
  const unsigned char* base;
  int elem_bytes, rank;
  unsigned long long dims[5], strides[5];  // strides in bytes; strides[0] = elem_bytes
  unsigned box[5];
  int swizzle_bytes;  // 0, 32, 64, 128
  bool nan_fill;
};
static_assert(sizeof(TensorMapRecord) <= sizeof(CUtensorMap));

}  // namespace simt

inline CUresult cuTensorMapEncodeTiled(CUtensorMap* tensorMap, CUtensorMapDataType tensorDataType, cuuint32_t tensorRank,
                                       void* globalAddress, const cuuint64_t* globalDim,
                                       const cuuint64_t* globalStrides, const cuuint32_t* boxDim,
                                       const cuuint32_t* elementStrides, CUtensorMapInterleave interleave,
                                       CUtensorMapSwizzle swizzle, CUtensorMapL2promotion,
                                       CUtensorMapFloatOOBfill oobFill) {
  static constexpr int kBytes[] = {1, 2, 4, 4, 8, 8, 2, 4, 8, 2};
  static constexpr int kSwizzleBytes[] = {0, 32, 64, 128};
  if (tensorMap == nullptr || static_cast<unsigned>(tensorDataType) > CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ||
      tensorRank < 1 || tensorRank > 5 || interleave != CU_TENSOR_MAP_INTERLEAVE_NONE ||
      reinterpret_cast<uintptr_t>(globalAddress) % 16 != 0)
    return CUDA_ERROR_INVALID_VALUE;
  simt::TensorMapRecord r{};
  r.base = static_cast<const unsigned char*>(globalAddress);
  r.elem_bytes = kBytes[tensorDataType];
  r.rank = static_cast<int>(tensorRank);
  r.swizzle_bytes = kSwizzleBytes[swizzle & 3];
  r.nan_fill = oobFill == CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA;
  for (int d = 0; d < r.rank; ++d) {
    r.dims[d] = globalDim[d];
    r.strides[d] = d == 0 ? r.elem_bytes : globalStrides[d - 1];
    r.box[d] = boxDim[d];
    if (globalDim[d] == 0 || globalDim[d] > (1ull << 32) || boxDim[d] == 0 || boxDim[d] > 256 ||
        elementStrides[d] != 1 || (d > 0 && (r.strides[d] % 16 != 0 || r.strides[d] >= (1ull << 40))))
      return CUDA_ERROR_INVALID_VALUE;
  }
  const unsigned inner_bytes = r.box[0] * r.elem_bytes;
  if (inner_bytes % 16 != 0 || (r.swizzle_bytes != 0 && inner_bytes != static_cast<unsigned>(r.swizzle_bytes)))
    return CUDA_ERROR_INVALID_VALUE;  // the driver allows a shorter row under a swizzle; not emulated
  std::memset(tensorMap, 0, sizeof *tensorMap);
  std::memcpy(tensorMap, &r, sizeof r);
  return CUDA_SUCCESS;
}

namespace simt {

inline TensorMapRecord read_map(unsigned long long map) {
  TensorMapRecord r;
  std::memcpy(&r, reinterpret_cast<const void*>(map), sizeof r);
  if (r.rank < 1 || r.rank > 5) throw std::invalid_argument("simt: a tensor map that cuTensorMapEncodeTiled did not encode");
  return r;
}

// Calls visit(global element address or nullptr when out of bounds, shared byte offset from the box's start)
// for every element of the box at `coords` (innermost first).
template <typename Visit>
void for_each_box_element(const TensorMapRecord& r, const int* coords, unsigned start, Visit visit) {
  unsigned volume = 1;
  for (int d = 0; d < r.rank; ++d) volume *= r.box[d];
  for (unsigned linear = 0; linear < volume; ++linear) {
    unsigned rest = linear;
    long long offset = 0;
    bool inside = true;
    for (int d = 0; d < r.rank; ++d) {
      const long long c = coords[d] + static_cast<long long>(rest % r.box[d]);
      rest /= r.box[d];
      inside = inside && c >= 0 && c < static_cast<long long>(r.dims[d]);
      offset += c * static_cast<long long>(r.strides[d]);
    }
    visit(inside ? r.base + offset : nullptr, box_address(start, linear * r.elem_bytes, r.swizzle_bytes));
  }
}

inline unsigned char* shared_at(unsigned offset) {
  return reinterpret_cast<unsigned char*>(g_dynamic_shared.data()) + offset;
}

inline unsigned box_start(const void* smem, const TensorMapRecord& r) {
  const unsigned start = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const unsigned alignment = r.swizzle_bytes ? 8u * r.swizzle_bytes : 128u;
  if (start % alignment != 0)
    throw std::invalid_argument("simt: a tensor-map box in shared memory must be aligned to " +
                                std::to_string(alignment) + " bytes (its swizzle pattern)");
  return start;
}

template <int kRank>
void tma_load(void* dst, unsigned long long map, void* bar, const int (&coords)[kRank]) {
  const TensorMapRecord r = read_map(map);
  if (r.rank != kRank) throw std::invalid_argument("simt: cp.async.bulk.tensor rank differs from the map's");
  const unsigned start = box_start(dst, r);
  Mbarrier& b = mbarrier_at(bar);
  std::array<int, 5> c{};
  for (int d = 0; d < kRank; ++d) c[d] = coords[d];
  b.copies.push_back([r, c, start]() -> long long {
    long long bytes = 0;
    for_each_box_element(r, c.data(), start, [&](const unsigned char* global, unsigned shared) {
      if (global != nullptr) {
        std::memcpy(shared_at(shared), global, r.elem_bytes);
      } else if (r.nan_fill) {
        std::memset(shared_at(shared), 0xff, r.elem_bytes);
      } else {
        std::memset(shared_at(shared), 0, r.elem_bytes);
      }
      bytes += r.elem_bytes;
    });
    return bytes;
  });
  g_block->idle_waits = 0;
}
inline void tma_load(void* dst, unsigned long long map, void* bar, int c0, int c1) { tma_load<2>(dst, map, bar, {c0, c1}); }
inline void tma_load(void* dst, unsigned long long map, void* bar, int c0, int c1, int c2) {
  tma_load<3>(dst, map, bar, {c0, c1, c2});
}
inline void tma_load(void* dst, unsigned long long map, void* bar, int c0, int c1, int c2, int c3) {
  tma_load<4>(dst, map, bar, {c0, c1, c2, c3});
}

template <int kRank>
void tma_store(unsigned long long map, const void* src, const int (&coords)[kRank]) {
  const TensorMapRecord r = read_map(map);
  if (r.rank != kRank) throw std::invalid_argument("simt: cp.async.bulk.tensor rank differs from the map's");
  const unsigned start = box_start(src, r);
  std::array<int, 5> c{};
  for (int d = 0; d < kRank; ++d) c[d] = coords[d];
  self().bulk_open.push_back([r, c, start] {
    for_each_box_element(r, c.data(), start, [&](const unsigned char* global, unsigned shared) {
      if (global != nullptr) std::memcpy(const_cast<unsigned char*>(global), shared_at(shared), r.elem_bytes);
    });
  });
}
inline void tma_store(unsigned long long map, const void* src, int c0, int c1) { tma_store<2>(map, src, {c0, c1}); }
inline void tma_store(unsigned long long map, const void* src, int c0, int c1, int c2) {
  tma_store<3>(map, src, {c0, c1, c2});
}
inline void tma_store(unsigned long long map, const void* src, int c0, int c1, int c2, int c3) {
  tma_store<4>(map, src, {c0, c1, c2, c3});
}
inline void bulk_commit() {
  Fiber& me = self();
  me.bulk_groups.push_back(std::move(me.bulk_open));
  me.bulk_open.clear();
}
inline void bulk_wait(int pending) { run_groups(self().bulk_groups, static_cast<size_t>(pending)); }

inline Warpgroup& my_warpgroup() {
  if (g_block->warpgroups.empty())
    throw std::invalid_argument("simt: a warpgroup instruction in a block whose size is not a multiple of 128");
  return g_block->warpgroups[self().warp / 4];
}

inline void wgmma_fence() { wait(my_warpgroup().barrier); }

inline void wgmma_commit() {
  Warpgroup& wg = my_warpgroup();
  wait(wg.barrier);  // every thread's part of the open operations is queued
  if (self().warp % 4 == 0 && self().lane == 0) {
    wg.groups.push_back(std::move(wg.open));
    wg.open.clear();
  }
  wait(wg.barrier);
}

inline void wgmma_wait(int pending) { run_groups(my_warpgroup().groups, static_cast<size_t>(pending)); }

template <typename In>
double smem_operand(unsigned long long desc, bool mn_major, int mn, int k) {
  unsigned short bits;
  std::memcpy(&bits, shared_at(operand_address(desc, mn_major, 2, mn, k)), 2);
  return static_cast<double>(In::to_float(bits));
}

// Queues this thread's part of an m64nNk16 wgmma whose A element (row, k) is a_at(row, k) when it runs, and
// waits for the warpgroup's other threads to queue theirs.
template <int kN, typename In, bool kTransB, typename AAt, typename... D>
void queue_wgmma(AAt a_at, unsigned long long desc_b, int scale_d, D&... d) {
  static_assert(sizeof...(D) == kN / 2, "wgmma m64nN: N / 2 accumulators per thread");
  static_assert(kN % 8 == 0 && kN >= 8 && kN <= 256);
  Warpgroup& wg = my_warpgroup();
  const int thread = (self().warp % 4) * 32 + self().lane;
  std::array<float*, kN / 2> out{&d...};
  wg.open.push_back([=] {
    for (int v = 0; v < kN / 2; ++v) {
      const AccumulatorCoord e = accumulator_element(thread, v);
      double dot = 0;
      for (int k = 0; k < 16; ++k) dot += a_at(e.row, k) * smem_operand<In>(desc_b, kTransB, e.col, k);
      *out[v] = static_cast<float>(scale_d ? dot + *out[v] : dot);
    }
  });
  wait(wg.barrier);
}

// Both operands from shared memory.
template <int kN, typename In, bool kTransA, bool kTransB, typename... D>
void wgmma(unsigned long long desc_a, unsigned long long desc_b, int scale_d, D&... d) {
  const auto a_at = [desc_a](int row, int k) { return smem_operand<In>(desc_a, kTransA, row, k); };
  queue_wgmma<kN, In, kTransB>(a_at, desc_b, scale_d, d...);
}

// A from the warpgroup's registers (four 32-bit registers of two 16-bit values per thread, the map of
// hopper_layouts.h's register_a_element), read when the operation runs: a kernel that overwrites them before
// its wait_group changes the product, as it may on the GPU.
struct RegisterA {
  std::array<const unsigned*, 128 * 4> registers{};
  bool gathered = false;
  double a[64][16];
};

template <int kN, typename In, bool kTransB, typename... D>
void wgmma_rs(const unsigned& a0, const unsigned& a1, const unsigned& a2, const unsigned& a3,
              unsigned long long desc_b, int scale_d, D&... d) {
  Warpgroup& wg = my_warpgroup();
  const int thread = (self().warp % 4) * 32 + self().lane;
  if (thread == 0) wg.register_a = std::make_shared<RegisterA>();
  wait(wg.barrier);  // one RegisterA per operation, before anyone records into it
  const std::shared_ptr<RegisterA> fragment = wg.register_a;
  const unsigned* mine[4] = {&a0, &a1, &a2, &a3};
  for (int r = 0; r < 4; ++r) fragment->registers[thread * 4 + r] = mine[r];
  const auto a_at = [fragment](int row, int k) {
    RegisterA& f = *fragment;
    if (!f.gathered) {
      for (int t = 0; t < 128; ++t)
        for (int index = 0; index < 8; ++index) {
          const AccumulatorCoord e = register_a_element(t, index);
          const unsigned bits = (*f.registers[t * 4 + index / 2] >> (16 * (index % 2))) & 0xffffu;
          f.a[e.row][e.col] = static_cast<double>(In::to_float(static_cast<unsigned short>(bits)));
        }
      f.gathered = true;
    }
    return f.a[row][k];
  };
  queue_wgmma<kN, In, kTransB>(a_at, desc_b, scale_d, d...);
}

template <int kRegisters>
void setmaxnreg() {
  static_assert(kRegisters >= 24 && kRegisters <= 256 && kRegisters % 8 == 0,
                "setmaxnreg: the register count must be a multiple of 8 in 24..256");
}

inline void named_barrier(unsigned id, unsigned count) {
  if (id >= 16 || count % 32 != 0 || count == 0)
    throw std::invalid_argument("simt: bar.sync needs an id below 16 and a thread count that is a multiple of 32");
  Barrier& b = g_block->named[id];
  if (b.live == 0) b.live = static_cast<int>(count);
  if (b.live != static_cast<int>(count)) throw std::invalid_argument("simt: bar.sync with two thread counts");
  wait(b);
}

}  // namespace simt
