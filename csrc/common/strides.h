// Where one head of one token lies in the tensors of the ops, for every device's kernels.
//
// The ops take per-head tensors in two layouts: padded [batch, seq, heads, dim] and packed
// [tokens, heads, dim] (varlen: samples are runs of tokens, found from cu_seqlens). Kernels read
// and write them through their element strides, so that views (the q, k, v of a fused QKV
// projection) go in without a copy; only the last dimension must be contiguous, which the host
// checks ensure. Row statistics such as attention's log-sum-exp ([batch, heads, seq] padded,
// [heads, tokens] packed) are described by the same three strides.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GLM_EXT_HOST_DEVICE __host__ __device__
#else
#define GLM_EXT_HOST_DEVICE
#endif

namespace glm_ext {

// Element strides per sample (0 in the packed layout, where the token index is global), token and
// head.
struct TokenStrides {
  int64_t batch = 0, token = 0, head = 0;

  // The element offset of (sample, token, head).
  GLM_EXT_HOST_DEVICE int64_t offset(int64_t sample, int64_t token_index, int64_t head_index) const {
    return sample * batch + token_index * token + head_index * head;
  }
};

// The strides of a [batch, seq, heads, dim] (4-D, padded) or [tokens, heads, dim] (3-D, packed)
// tensor (an at::Tensor, or anything with dim() and stride(d)).
template <typename Tensor>
TokenStrides token_strides(const Tensor& t) {
  return {t.dim() == 4 ? t.stride(0) : 0, t.stride(-3), t.stride(-2)};
}

}  // namespace glm_ext
