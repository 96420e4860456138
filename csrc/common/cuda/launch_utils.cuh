// Small launch helpers shared by the CUDA kernels.
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <cstddef>
#include <cstdint>

namespace glm_ext::cuda {

constexpr int kThreadsPerBlock = 256;
// Grid-stride kernels launch at most this many blocks per SM: a few waves of full occupancy.
constexpr int kMaxBlocksPerSm = 32;

// N consecutive elements moved as one access: 16 bytes for vectorized paths, one element for the
// scalar fallbacks.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

inline int64_t max_grid_blocks() {
  return int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * kMaxBlocksPerSm;
}

}  // namespace glm_ext::cuda
