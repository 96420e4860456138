// Small launch helpers shared by the CUDA kernels (host code: they query the current device).
#pragma once

#include <ATen/cuda/CUDAContext.h>

#include <cstddef>
#include <cstdint>

#include "common/cuda/vec.cuh"

namespace glm_ext::cuda {

// Grid-stride kernels launch at most this many blocks per SM: a few waves of full occupancy.
constexpr int kMaxBlocksPerSm = 32;

inline bool is_aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

inline int64_t max_grid_blocks() {
  return int64_t{at::cuda::getCurrentDeviceProperties()->multiProcessorCount} * kMaxBlocksPerSm;
}

}  // namespace glm_ext::cuda
