// A small SIMT emulator that runs csrc/ kernels on the CPU, so that their numbers can be checked in CI on a
// machine with no GPU. Included before a .cu file compiled by g++ as C++20 with __CUDACC_RTC__ defined (which
// hides the host launchers and their <<<...>>> syntax, as for NVRTC).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after another. A fiber
// runs until it reaches a barrier (__syncthreads, __syncwarp, or a warp shuffle, which is a write of the lane's
// value, a barrier, a read of the partner's and a second barrier), then the next fiber runs. A barrier opens
// when every live thread of its warp or block has reached it; a thread that returns leaves its barriers, so
// whole warps may exit early as they do on a GPU. Scheduling is deterministic. What it cannot run: code that
// relies on warps running in lockstep without a shuffle or barrier between. Inline PTX is rewritten by the test
// build (tests/csrc/simt_build.py) into calls of simt::lop3, of the tensor-core and async-copy instructions
// of ptx.h (mma.sync m16n8k16, ldmatrix, cp.async) and of Hopper's of hopper.h (mbarrier, tensor-map copies,
// wgmma); the build defines __CUDA_ARCH__ as 800 and __CUDA_ARCH_FEAT_SM90_ALL, so the sm_80 and the sm_90a
// paths compile; any other PTX fails the build. Shared-memory addresses (__cvta_generic_to_shared) are offsets
// into the launch's dynamic shared memory. An exception thrown by a thread (a misused instruction, a deadlock
// found by hopper.h) stops the launch and is rethrown by simt::launch.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda_bf16.h"
#include "cuda_fp16.h"
#include "vector_types.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))  // GNU form: allowed among the decl-specifiers
// extern __shared__ T name[] (csrc/common.cuh): the launch's dynamic shared memory, sized by simt::launch.
#define GF_DYNAMIC_SHARED(type, name) type* const name = reinterpret_cast<type*>(simt::g_dynamic_shared.data())

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};

namespace simt {

struct Barrier {
  int live = 0, arrived = 0;
  long generation = 0;
};

// One cp.async copy waiting for its group to complete (ptx.h): size bytes at dst, the first src_size from src.
struct PendingCopy {
  unsigned char* dst;
  const unsigned char* src;
  int size, src_size;
};

inline void land(const std::vector<PendingCopy>& copies) {
  for (const PendingCopy& c : copies) {
    std::memcpy(c.dst, c.src, c.src_size);
    std::memset(c.dst + c.src_size, 0, c.size - c.src_size);
  }
}

// An asynchronous operation (hopper.h: a wgmma, a tensor-map store) that runs when a wait lets its group complete.
using AsyncOp = std::function<void()>;
using AsyncGroups = std::vector<std::vector<AsyncOp>>;  // committed groups, oldest first

inline void run_groups(AsyncGroups& groups, size_t keep) {
  while (groups.size() > keep) {
    for (AsyncOp& op : groups.front()) op();
    groups.erase(groups.begin());
  }
}

// One mbarrier of shared memory (hopper.h): its phase completes when the pending arrivals and the transaction
// bytes are both zero; tensor-map loads tracked by it land (and count their bytes) when a thread waits on it.
struct Mbarrier {
  int expected = 0, pending = 0;
  long long tx = 0, phase = 0;
  std::vector<std::function<long long()>> copies;  // each lands one box and returns its bytes
};

// The 128 threads of warps 4i .. 4i+3: their barrier and their wgmma groups.
struct RegisterA;  // hopper.h: the A fragment of a wgmma reading A from registers

struct Warpgroup {
  Barrier barrier;
  std::vector<AsyncOp> open;
  AsyncGroups groups;
  std::shared_ptr<RegisterA> register_a;  // the one being issued
};

struct Fiber {
  ucontext_t context;
  std::vector<char> stack;
  dim3 thread_idx;
  int warp = 0, lane = 0;
  bool done = false;
  std::vector<PendingCopy> cp_open;                // cp.async copies not yet committed
  std::vector<std::vector<PendingCopy>> cp_groups;  // committed groups, oldest first
  std::vector<AsyncOp> bulk_open;                  // tensor-map stores not yet committed (hopper.h)
  AsyncGroups bulk_groups;
};

struct Block {
  struct Wide {
    uint64_t words[8];
  };
  std::vector<Fiber> fibers;
  std::vector<Barrier> warps;
  Barrier block;
  std::vector<uint64_t> slots;  // one shuffle slot per thread
  std::vector<Wide> wide;       // one operand record per thread for warp-collective instructions (ptx.h)
  std::vector<Warpgroup> warpgroups;          // threads / 128 of them (none when that does not divide)
  Barrier named[16];                          // bar.sync id, count: live is the count of its first use
  std::map<const void*, Mbarrier> mbarriers;  // by shared-memory address
  long long idle_waits = 0;                   // mbarrier waits that failed since anything changed (hopper.h)
  ucontext_t scheduler;
  int current = 0;
};

inline Block* g_block = nullptr;
inline dim3 g_block_idx, g_block_dim, g_grid_dim;
struct alignas(16) SharedWord {
  unsigned char bytes[16];
};
inline std::vector<SharedWord> g_dynamic_shared;  // 16-byte aligned, as CUDA's dynamic shared memory

inline Fiber& self() { return g_block->fibers[g_block->current]; }

// Back to the scheduler, which resumes the next fiber that has not finished.
inline void yield() { swapcontext(&self().context, &g_block->scheduler); }

inline void open_if_full(Barrier& b) {
  if (b.arrived == b.live && b.live > 0) {
    b.arrived = 0;
    ++b.generation;
    g_block->idle_waits = 0;
  }
}

inline void wait(Barrier& b) {
  const long generation = b.generation;
  ++b.arrived;
  open_if_full(b);
  while (b.generation == generation) yield();
}

inline void leave(Barrier& b) {
  --b.live;
  open_if_full(b);
}

template <typename T>
T shuffle(T value, int src_lane) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  Fiber& me = self();
  const int base = me.warp * 32;
  std::memcpy(&g_block->slots[base + me.lane], &value, sizeof(T));
  wait(g_block->warps[me.warp]);
  T out;
  std::memcpy(&out, &g_block->slots[base + (src_lane & 31)], sizeof(T));
  wait(g_block->warps[me.warp]);
  return out;
}

inline std::function<void()>* g_body = nullptr;
inline std::string g_error;  // what the first thread that threw said

inline void fiber_main() {
  Fiber& me = self();
  try {
    (*g_body)();
    for (const auto& group : me.cp_groups) land(group);  // copies in flight land even if never waited for
    land(me.cp_open);
    me.bulk_groups.push_back(std::move(me.bulk_open));
    run_groups(me.bulk_groups, 0);
  } catch (const std::exception& e) {
    if (g_error.empty()) g_error = e.what();
  }
  me.done = true;
  leave(g_block->warps[me.warp]);
  leave(g_block->block);
  if (!g_block->warpgroups.empty()) leave(g_block->warpgroups[me.warp / 4].barrier);
  yield();  // never resumed
}

// kernel<<<grid, block, shared_bytes>>>(args...); threads per block a multiple of 32. Every block starts with
// its dynamic shared memory filled with 0xff bytes (NaN as floats), so a read before a write shows.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, Kernel kernel, Args... args) {
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads % 32 != 0) throw std::invalid_argument("simt::launch: threads per block must be a multiple of 32");
  g_dynamic_shared.resize((shared_bytes + sizeof(SharedWord) - 1) / sizeof(SharedWord));
  std::function<void()> body = [&] { kernel(args...); };
  g_body = &body;
  g_block_dim = block;
  g_grid_dim = grid;
  Block b;  // fibers and their stacks are reused by every block of the grid
  b.fibers.resize(threads);
  b.warps.resize(threads / 32);
  b.slots.resize(threads);
  b.wide.resize(threads);
  b.warpgroups.resize(threads % 128 == 0 ? threads / 128 : 0);
  for (auto& f : b.fibers) f.stack.resize(64 * 1024);
  g_block = &b;
  g_error.clear();
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        for (auto& w : b.warps) w = Barrier{32, 0, 0};
        b.block = Barrier{threads, 0, 0};
        for (auto& wg : b.warpgroups) wg = Warpgroup{Barrier{128, 0, 0}, {}, {}};
        for (auto& n : b.named) n = Barrier{};
        b.mbarriers.clear();
        b.idle_waits = 0;
        g_block_idx = {bx, by, bz};
        if (!g_dynamic_shared.empty())
          std::memset(g_dynamic_shared.data(), 0xff, g_dynamic_shared.size() * sizeof(SharedWord));
        for (int t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[t];
          f.thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          f.warp = t / 32;
          f.lane = t % 32;
          f.done = false;
          f.cp_open.clear();
          f.cp_groups.clear();
          f.bulk_open.clear();
          f.bulk_groups.clear();
          getcontext(&f.context);
          f.context.uc_stack.ss_sp = f.stack.data();
          f.context.uc_stack.ss_size = f.stack.size();
          f.context.uc_link = nullptr;
          makecontext(&f.context, fiber_main, 0);
        }
        for (int remaining = threads; remaining > 0;) {
          remaining = 0;
          for (b.current = 0; b.current < threads; ++b.current) {
            if (b.fibers[b.current].done) continue;
            swapcontext(&b.scheduler, &b.fibers[b.current].context);
            if (!g_error.empty()) {  // the other threads' stacks are dropped where they stand
              g_block = nullptr;
              g_body = nullptr;
              throw std::runtime_error(g_error);
            }
            remaining += !b.fibers[b.current].done;
          }
        }
        for (const Warpgroup& wg : b.warpgroups)
          if (!wg.open.empty() || !wg.groups.empty())
            throw std::runtime_error("simt: a warpgroup exited with wgmma operations never waited for");
      }
  g_block = nullptr;
  g_body = nullptr;
}

}  // namespace simt

#define threadIdx (simt::self().thread_idx)
#define blockIdx (simt::g_block_idx)
#define blockDim (simt::g_block_dim)
#define gridDim (simt::g_grid_dim)

inline void __syncthreads() { simt::wait(simt::g_block->block); }
inline void __syncwarp(unsigned = 0xffffffffu) { simt::wait(simt::g_block->warps[simt::self().warp]); }
template <typename T>
T __shfl_xor_sync(unsigned, T value, int mask) { return simt::shuffle(value, simt::self().lane ^ mask); }
template <typename T>
T __shfl_sync(unsigned, T value, int src_lane) { return simt::shuffle(value, src_lane); }
template <typename T>
T __shfl_down_sync(unsigned, T value, int delta) {
  const int src = simt::self().lane + delta;
  return simt::shuffle(value, src < 32 ? src : simt::self().lane);
}
inline float atomicAdd(float* address, float value) {  // one OS thread: a plain read-modify-write is atomic
  const float old = *address;
  *address = old + value;
  return old;
}

inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __int_as_float(int x) {
  float f;
  std::memcpy(&f, &x, 4);
  return f;
}
// The shared-memory address of a pointer into the launch's dynamic shared memory: its offset there (so the
// start is aligned to any swizzle pattern). Static __shared__ arrays have none.
inline unsigned long long __cvta_generic_to_shared(const void* p) {
  const auto* base = reinterpret_cast<const unsigned char*>(simt::g_dynamic_shared.data());
  const auto* at = static_cast<const unsigned char*>(p);
  if (at < base || at >= base + simt::g_dynamic_shared.size() * sizeof(simt::SharedWord))
    throw std::invalid_argument("simt: a shared-memory address outside the launch's dynamic shared memory");
  return static_cast<unsigned long long>(at - base);
}
template <typename T>
T __ldcs(const T* p) { return *p; }  // a load with an evict-first cache hint: the hint has no host meaning

namespace simt {
// PTX lop3.b32 d, a, b, c, imm: bit i of d is bit (4 a_i + 2 b_i + c_i) of imm, the truth table that imm
// encodes as f(0xF0, 0xCC, 0xAA).
template <unsigned kImm>
unsigned lop3(unsigned a, unsigned b, unsigned c) {
  static_assert(kImm < 256, "lop3: the truth table is 8 bits");
  unsigned d = 0;
  for (unsigned minterm = 0; minterm < 8; ++minterm)
    if ((kImm >> minterm) & 1u) d |= (minterm & 4 ? a : ~a) & (minterm & 2 ? b : ~b) & (minterm & 1 ? c : ~c);
  return d;
}
}  // namespace simt

template <typename A, typename B>
auto min(A a, B b) { return b < a ? b : a; }
template <typename A, typename B>
auto max(A a, B b) { return a < b ? b : a; }
