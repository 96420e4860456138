// Just enough of CUDA's execution model on the CPU to run the CUDA kernels of csrc/ (the
// flash-attention kernels, rotary_2d, span_shuffle_batch) unchanged: one thread block at a time,
// each CUDA thread a fiber (ucontext) on one OS thread, switched only at barriers, so that runs
// are deterministic. __syncthreads / __syncwarp are real barriers (a barrier some threads never
// reach is reported as a deadlock, not hung), warp-collective instructions exchange their
// operands through per-warp slots between two warp barriers, and each block's shared memory is
// checked for writes past its end. Test infrastructure only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
#ifndef __forceinline__
#define __forceinline__ inline
#endif

namespace emu {

constexpr int kWarpSize = 32;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kSlotBytes = 64;  // the largest operand one lane hands to a warp collective

// A cp.async copy in flight: the 16 bytes it read (zeros for a zero-fill), landing at dst when its
// group completes.
struct PendingCopy {
  void* dst;
  unsigned char bytes[16];
};

struct Fiber {
  ucontext_t context;
  std::vector<PendingCopy> open_group;                 // issued, not yet committed
  std::vector<std::vector<PendingCopy>> committed;     // oldest first
  std::vector<char> stack;
  uint3 thread_idx;
  bool done = false;
  int waiting_on = -1;  // barrier id: 0 the block, 1 + w warp w
};

struct BlockState {
  uint3 block_idx;
  dim3 grid_dim, block_dim;
  std::vector<Fiber> fibers;
  int current = -1;
  ucontext_t scheduler;
  std::vector<int> arrived;                // per barrier id
  std::vector<unsigned char> warp_slots;   // [warp][lane][kSlotBytes]
  std::function<void()> body;
  std::string error;
};

// How the emulated cp.async behaves: copies land when issued (false) or as late as the program
// allows, at the cp.async.wait_group that needs them (true). The tests run both.
inline bool& deferred_copies() {
  static bool deferred = false;
  return deferred;
}

// The shared memory of the running block, [begin, end): every shared access is checked against it.
struct SharedWindow {
  const unsigned char* begin = nullptr;
  const unsigned char* end = nullptr;
};
inline SharedWindow& shared_window() {
  static SharedWindow window;
  return window;
}

inline void check_shared(const void* p, size_t bytes, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  const auto& w = shared_window();
  if (c < w.begin || c + bytes > w.end || reinterpret_cast<uintptr_t>(c) % 16 != 0) {
    throw std::runtime_error(std::string(what) + ": shared address outside the block's shared memory or not "
                             "16-byte aligned");
  }
}

inline BlockState*& block() {
  static BlockState* state = nullptr;
  return state;
}
inline Fiber& self() { return block()->fibers[block()->current]; }
inline int warp_of(int thread) { return thread / kWarpSize; }
inline int linear_thread(const Fiber& f) {
  const auto& b = *block();
  return f.thread_idx.x + b.block_dim.x * (f.thread_idx.y + b.block_dim.y * f.thread_idx.z);
}

inline int members_alive(int barrier) {
  int alive = 0;
  for (const auto& f : block()->fibers) {
    if (!f.done && (barrier == 0 || warp_of(linear_thread(f)) == barrier - 1)) ++alive;
  }
  return alive;
}

inline void release_if_complete(int barrier) {
  auto& b = *block();
  if (b.arrived[barrier] == 0 || b.arrived[barrier] < members_alive(barrier)) return;
  b.arrived[barrier] = 0;
  for (auto& f : b.fibers) {
    if (f.waiting_on == barrier) f.waiting_on = -1;
  }
}

inline void yield() { swapcontext(&self().context, &block()->scheduler); }

inline void barrier(int id) {
  auto& b = *block();
  ++b.arrived[id];
  self().waiting_on = id;
  release_if_complete(id);
  if (self().waiting_on != -1) yield();
}

inline void fiber_entry() {
  try {
    block()->body();
    if (!self().open_group.empty() || !self().committed.empty()) {
      throw std::runtime_error("a thread exited with cp.async copies still in flight");
    }
  } catch (const std::exception& e) {
    block()->error = e.what();
  }
  self().done = true;
  for (size_t id = 0; id < block()->arrived.size(); ++id) release_if_complete(static_cast<int>(id));
  swapcontext(&self().context, &block()->scheduler);
}

// Runs body as every thread of one block; throws on a deadlock or an error inside the body.
inline void run_block(dim3 grid_dim, uint3 block_idx, dim3 block_dim, const std::function<void()>& body) {
  static std::vector<Fiber> pool;
  const int threads = block_dim.x * block_dim.y * block_dim.z;
  const int warps = (threads + kWarpSize - 1) / kWarpSize;
  BlockState state;
  state.block_idx = block_idx;
  state.grid_dim = grid_dim;
  state.block_dim = block_dim;
  state.body = body;
  state.arrived.assign(1 + warps, 0);
  state.warp_slots.assign(static_cast<size_t>(warps) * kWarpSize * kSlotBytes, 0);
  if (pool.size() < static_cast<size_t>(threads)) pool.resize(threads);
  state.fibers.swap(pool);
  block() = &state;
  for (int t = 0; t < threads; ++t) {
    Fiber& f = state.fibers[t];
    f.stack.resize(kStackBytes);
    f.done = false;
    f.waiting_on = -1;
    f.open_group.clear();
    f.committed.clear();
    f.thread_idx = {static_cast<unsigned>(t % block_dim.x), static_cast<unsigned>(t / block_dim.x % block_dim.y),
                    static_cast<unsigned>(t / (block_dim.x * block_dim.y))};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  int finished = 0;
  while (finished < threads) {
    bool progressed = false;
    for (int t = 0; t < threads; ++t) {
      Fiber& f = state.fibers[t];
      if (f.done || f.waiting_on != -1) continue;
      state.current = t;
      swapcontext(&state.scheduler, &f.context);
      progressed = true;
      if (f.done) ++finished;
    }
    if (!progressed && finished < threads) {
      if (state.error.empty()) state.error = "deadlock: threads wait at a barrier that the others never reach";
      break;
    }
  }
  state.fibers.swap(pool);
  block() = nullptr;
  if (!state.error.empty()) throw std::runtime_error(state.error);
}

// A warp collective: every lane hands in `mine`; once all have, each lane computes its result
// from all lanes' operands (lanes[i] is lane i's), then all leave together.
template <typename In, typename F>
auto warp_collective(const In& mine, F compute) {
  static_assert(sizeof(In) <= kSlotBytes);
  auto& b = *block();
  const int thread = linear_thread(self());
  const int warp = warp_of(thread), lane = thread % kWarpSize;
  unsigned char* slots = b.warp_slots.data() + static_cast<size_t>(warp) * kWarpSize * kSlotBytes;
  std::memcpy(slots + lane * kSlotBytes, &mine, sizeof(In));
  barrier(1 + warp);
  In lanes[kWarpSize];
  for (int i = 0; i < kWarpSize; ++i) std::memcpy(&lanes[i], slots + i * kSlotBytes, sizeof(In));
  auto result = compute(lanes, lane);
  barrier(1 + warp);
  return result;
}

// Runs kernel(args...) as every block of `grid`, one block after the other (kernels without shared
// memory; harness.cpp's launch also checks the shared memory of the attention kernels).
template <typename Kernel, typename... Args>
void launch_grid(dim3 grid, dim3 block_dim, Kernel kernel, const Args&... args) {
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) run_block(grid, {x, y, z}, block_dim, [&] { kernel(args...); });
    }
  }
}

}  // namespace emu

#define threadIdx (::emu::self().thread_idx)
#define blockIdx (::emu::block()->block_idx)
#define gridDim (::emu::block()->grid_dim)
#define blockDim (::emu::block()->block_dim)

inline void __syncthreads() { emu::barrier(0); }
inline void __syncwarp(unsigned = 0xffffffffu) {
  emu::barrier(1 + emu::warp_of(emu::linear_thread(emu::self())));
}
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
  return emu::warp_collective(value, [&](const float* lanes, int lane) { return lanes[lane ^ lane_mask]; });
}

namespace glm_ext::cuda::flash {
using std::max;
using std::min;
}  // namespace glm_ext::cuda::flash
