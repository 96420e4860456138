// Shared by the CPU and CUDA kernels of the 2D position ops (embedding_2d, rotary_2d):
// argument validation, so that every device rejects bad input with the same message, and the
// small pieces of math both kernels must agree on.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>

#include "common/strides.h"

namespace glm_ext {

// Ids of one embedding_2d call after validation: contiguous, one integer dtype for all three.
struct Embedding2dIds {
  at::Tensor input_ids;
  at::Tensor position_ids;
  at::Tensor block_position_ids;
};

// Checks dtypes, devices and shapes of an embedding_2d forward call (not the id values: the CPU
// kernel checks those as it reads them, the CUDA kernel guards its reads; see ops.py).
Embedding2dIds check_embedding_2d_inputs(const at::Tensor& input_ids,
                                         const at::Tensor& position_ids,
                                         const at::Tensor& block_position_ids,
                                         const at::Tensor& word_weight,
                                         const at::Tensor& position_weight,
                                         const at::Tensor& block_position_weight);

// The same for the backward: grad_output must be [*ids.shape, hidden] of a floating dtype.
Embedding2dIds check_embedding_2d_backward_inputs(const at::Tensor& grad_output,
                                                  const at::Tensor& input_ids,
                                                  const at::Tensor& position_ids,
                                                  const at::Tensor& block_position_ids,
                                                  int64_t num_words, int64_t num_positions,
                                                  int64_t num_block_positions);

// Geometry of a rotary_2d call. x is [batch, seq, heads, head_dim] or [tokens, heads, head_dim]
// (then batch == 1). Kernels address x through its strides, so only its last dimension must be
// contiguous (x is copied otherwise); ids are made contiguous int64.
struct Rotary2dArgs {
  at::Tensor x;
  at::Tensor position_ids;        // [batch * seq], contiguous
  at::Tensor block_position_ids;  // [batch * seq], contiguous
  int64_t batch, seq, heads, head_dim;
  TokenStrides x_strides;
};

Rotary2dArgs check_rotary_2d_inputs(const at::Tensor& x, const at::Tensor& position_ids,
                                    const at::Tensor& block_position_ids, double base,
                                    const char* x_name);

// Rotary frequency of pair j in a half of size rot_dim = head_dim / 2 (ChatGLM's table:
// inv_freq[j] = base^(-2j / rot_dim)). Evaluated in T (float for 16/32-bit inputs, double for
// float64), like the reference.
template <typename T>
#if defined(__CUDACC__)
__host__ __device__
#endif
inline T rotary_inv_freq(int64_t j, int64_t rot_dim, T base) {
  return T(1) / std::pow(base, T(2 * j) / T(rot_dim));
}

}  // namespace glm_ext
