// Entry points of the mixed-mask flash-attention kernels, one instantiation per (element type,
// head dimension), compiled in forward.cu and backward.cu; called by mixed_mask_attention.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "flash_params.h"

namespace glm_ext::cuda::flash {

// The element types and head dimensions with a kernel.
#define GLM_EXT_FLASH_FOR_EACH_CONFIG(F) \
  F(__half, 64)                          \
  F(__half, 128)                         \
  F(__nv_bfloat16, 64)                   \
  F(__nv_bfloat16, 128)

// out and lse. max_seqlen_q bounds every sample's query count (it sizes the grid).
template <typename T, int D>
void run_forward(const ForwardParams& params, int64_t max_seqlen_q, cudaStream_t stream);

// grad_q, grad_k and grad_v, after params.delta has been computed (compute_delta). Deterministic:
// no atomics, every element is summed in a fixed order.
template <typename T, int D>
void run_backward(const BackwardParams& params, int64_t max_seqlen_q, int64_t max_seqlen_k,
                  cudaStream_t stream);

}  // namespace glm_ext::cuda::flash
