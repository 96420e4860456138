// Device-side helpers shared by the CUDA kernels that need no CUDA runtime call, so that kernels
// built on them also compile for the CPU emulation of CUDA in the tests (python_tests/flash_emulator).
#pragma once

#include <cstdint>

namespace glm_ext::cuda {

constexpr int kThreadsPerBlock = 256;

// N consecutive elements moved as one access: 16 bytes for vectorized paths, one element for the
// scalar fallbacks.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace glm_ext::cuda
