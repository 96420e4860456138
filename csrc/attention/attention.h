// Shared by every device's kernels of mixed_mask_attention (GLM_SPEC section 2): argument checks,
// so that all devices reject bad input with the same message, the layout of the tensors after
// the checks, and the per-sample table read from sep / cu_seqlens on the host.
//
// Layouts. Padded: q [batch, seq_q, heads_q, head_dim], k and v [batch, seq_k, heads_kv, head_dim],
// sep [batch]. Packed (flash-attention's "varlen"): q [total_q, heads_q, head_dim], k and v
// [total_k, heads_kv, head_dim], cu_seqlens_q / cu_seqlens_k int32 [n + 1], sep [n]. Query i of a
// sample with len_q queries and len_k keys has the absolute position len_k - len_q + i and sees key
// j iff j < sep or j <= position, so the keys it sees are always a prefix [0, visible) with
// visible = min(len_k, max(sep, position + 1)). heads_q is a multiple of heads_kv (query head h
// reads key/value head h / (heads_q / heads_kv)).
//
// Outputs: out like q (contiguous) and lse, the natural log-sum-exp of the scaled scores of each
// query row: float32 (float64 for float64 inputs), [batch, heads_q, seq_q] padded and
// [heads_q, total_q] packed (flash-attention's convention).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

#include "common/strides.h"

namespace glm_ext {

// The largest head dimension any kernel accepts (the CPU kernel takes every size 1..256; device
// kernels may accept fewer and say so in their own check).
constexpr int64_t kMixedMaskMaxHeadDim = 256;

struct MixedMaskAttentionArgs {
  at::Tensor q, k, v;                     // last dimension contiguous (copied otherwise)
  at::Tensor sep;                         // int32 [num_samples], contiguous
  at::Tensor cu_seqlens_q, cu_seqlens_k;  // int32 [num_samples + 1], contiguous; undefined if padded
  bool packed = false;
  int64_t num_samples = 0;     // batch, or n packed
  int64_t seq_q = 0, seq_k = 0;  // padded: the sequence lengths; packed: total_q, total_k
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;  // as passed (packed: an upper bound, 0 = unknown)
  int64_t heads_q = 0, heads_kv = 0, head_dim = 0;
  double softmax_scale = 1.0;
  TokenStrides q_strides, k_strides, v_strides;  // head_dim is contiguous after the checks

  // Shape of the log-sum-exp: [batch, heads_q, seq_q] padded, [heads_q, total_q] packed.
  std::vector<int64_t> lse_shape() const;
  at::ScalarType lse_dtype() const;  // float64 for float64 inputs, else float32
  // The strides of the (contiguous) log-sum-exp, and of every row statistic laid out like it.
  TokenStrides lse_strides() const;
};

// Checks dtypes, devices and shapes of a forward call (not the values of sep and cu_seqlens:
// see mixed_mask_attention_samples). max_seqlen_q / max_seqlen_k are ignored in the padded layout.
MixedMaskAttentionArgs check_mixed_mask_attention_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& sep,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale);

struct MixedMaskAttentionBackwardArgs {
  MixedMaskAttentionArgs forward;
  at::Tensor grad_out, out;  // like q, last dimension contiguous
  at::Tensor lse;            // lse_shape(), lse_dtype(), contiguous
  at::Tensor grad_lse;       // like lse, or undefined (no gradient flows into lse)
  TokenStrides grad_out_strides, out_strides;
};

// The same for the backward: the forward's arguments plus grad_out and out (q's shape and dtype),
// lse (the forward's) and the optional grad_lse (lse's shape).
MixedMaskAttentionBackwardArgs check_mixed_mask_attention_backward_inputs(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& sep, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale);

// One GLM sample: where its queries and keys start (token offsets inside the packed tensors, 0
// when padded), its batch index (padded; 0 when packed), its lengths and its sep.
struct MixedMaskSample {
  int64_t batch_index, q_start, k_start, len_q, len_k, sep;
};

// The per-sample table, with every value checked (sep in [0, len_k], len_q <= len_k, cu_seqlens
// starting at 0, never decreasing and ending at the token counts, lengths within max_seqlen when
// it is given). Reads sep and cu_seqlens, which must be CPU tensors (a device kernel copies them
// to the host first, or guards its reads instead).
std::vector<MixedMaskSample> mixed_mask_attention_samples(const MixedMaskAttentionArgs& args);

// The offset in elements of token `row` of `sample` (counted from `start`, its q_start or
// k_start), head `head`, in a tensor with `strides`.
inline int64_t attention_offset(const TokenStrides& strides, const MixedMaskSample& sample,
                                int64_t start, int64_t row, int64_t head) {
  return strides.offset(sample.batch_index, start + row, head);
}

}  // namespace glm_ext
