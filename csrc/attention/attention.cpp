#include "attention/attention.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

namespace glm_ext {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

// Kernels read the head dimension contiguously; any other strides are taken as they are (the
// q/k/v views of a fused QKV projection go in without a copy).
at::Tensor with_contiguous_head_dim(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

void check_index_tensor(const at::Tensor& t, const char* name, const at::Tensor& q, bool int32_only) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt || (!int32_only && t.scalar_type() == at::kLong),
                   "mixed_mask_attention: ", name, int32_only ? " must be int32" : " must be int32 or int64",
                   ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == q.device(), "mixed_mask_attention: ", name,
                    " must be on the device of q (", q.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.dim() == 1, "mixed_mask_attention: ", name, " must be 1-D, got shape ",
                    t.sizes());
}

void check_like(const at::Tensor& t, const char* name, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), "mixed_mask_attention: ", name,
                   " must have the dtype of ", like_name, " (", like.scalar_type(), "), got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == like.device(), "mixed_mask_attention: ", name,
                    " must be on the device of ", like_name, " (", like.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == like.sizes(), "mixed_mask_attention: ", name,
                    " must have the shape of ", like_name, " ", like.sizes(), ", got ", t.sizes());
}

// sep as int32 for the kernels, never wrapped: host values beyond int32 are refused here (the
// contract's range check in mixed_mask_attention_samples sees only int32), device values saturate
// to INT32_MIN / INT32_MAX, which the device-side check then rejects without a synchronisation.
at::Tensor sep_as_int32(const at::Tensor& sep) {
  if (sep.scalar_type() == at::kInt) return sep.contiguous();
  constexpr int64_t kLow = std::numeric_limits<int32_t>::min(), kHigh = std::numeric_limits<int32_t>::max();
  if (sep.device().is_cpu()) {
    const auto values = sep.contiguous();
    const int64_t* v = values.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < values.numel(); ++i) {
      TORCH_CHECK_VALUE(v[i] >= kLow && v[i] <= kHigh, "mixed_mask_attention: sep must lie in [0, L] with L the "
                        "length of its sample, got sep[", i, "] = ", v[i]);
    }
  }
  return sep.clamp(kLow, kHigh).to(at::kInt).contiguous();
}

// "[0, 3, 7]" (the first 16 values, then "...").
std::string int_list(const int32_t* values, int64_t n) {
  std::string text = "[";
  for (int64_t i = 0; i < n && i < 16; ++i) text += (i ? ", " : "") + std::to_string(values[i]);
  return text + (n > 16 ? ", ...]" : "]");
}

}  // namespace

std::vector<int64_t> MixedMaskAttentionArgs::lse_shape() const {
  if (packed) return {heads_q, seq_q};
  return {num_samples, heads_q, seq_q};
}

TokenStrides MixedMaskAttentionArgs::lse_strides() const {
  return {packed ? 0 : heads_q * seq_q, 1, seq_q};
}

at::ScalarType MixedMaskAttentionArgs::lse_dtype() const {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

MixedMaskAttentionArgs check_mixed_mask_attention_inputs(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& sep,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale) {
  TORCH_CHECK_VALUE(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
                    "mixed_mask_attention: pass both cu_seqlens_q and cu_seqlens_k (packed layout) "
                    "or neither (padded layout)");
  const bool packed = cu_seqlens_q.has_value();
  const int64_t dims = packed ? 3 : 4;
  const char* layout_text = packed ? "[total, heads, head_dim] (packed, with cu_seqlens)"
                                   : "[batch, seq, heads, head_dim] (padded, without cu_seqlens)";
  TORCH_CHECK_TYPE(is_supported_float(q.scalar_type()),
                   "mixed_mask_attention: q must be float32, float16, bfloat16 or float64, got ",
                   q.scalar_type());
  for (auto [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK_VALUE(t->dim() == dims, "mixed_mask_attention: ", name, " must be ", layout_text,
                      ", got shape ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == q.scalar_type(), "mixed_mask_attention: ", name,
                     " must have the dtype of q (", q.scalar_type(), "), got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->device() == q.device(), "mixed_mask_attention: ", name,
                      " must be on the device of q (", q.device(), "), got ", t->device());
  }
  TORCH_CHECK_VALUE(v.sizes() == k.sizes(), "mixed_mask_attention: v must have the shape of k ",
                    k.sizes(), ", got ", v.sizes());
  const int64_t head_dim = q.size(-1);
  TORCH_CHECK_VALUE(k.size(-1) == head_dim, "mixed_mask_attention: k must have the head_dim of q (",
                    head_dim, "), got ", k.size(-1));
  TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= kMixedMaskMaxHeadDim,
                    "mixed_mask_attention: head_dim must lie in [1, ", kMixedMaskMaxHeadDim,
                    "], got ", head_dim);
  const int64_t heads_q = q.size(-2), heads_kv = k.size(-2);
  TORCH_CHECK_VALUE(heads_kv >= 1 && heads_q >= 1 && heads_q % heads_kv == 0,
                    "mixed_mask_attention: the heads of q (", heads_q,
                    ") must be a positive multiple of the heads of k and v (", heads_kv, ")");
  check_index_tensor(sep, "sep", q, /*int32_only=*/false);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale),
                    "mixed_mask_attention: softmax_scale must be finite, got ", softmax_scale);

  MixedMaskAttentionArgs args;
  args.packed = packed;
  args.heads_q = heads_q;
  args.heads_kv = heads_kv;
  args.head_dim = head_dim;
  args.softmax_scale = softmax_scale;
  args.seq_q = q.size(-3);
  args.seq_k = k.size(-3);
  if (packed) {
    check_index_tensor(*cu_seqlens_q, "cu_seqlens_q", q, /*int32_only=*/true);
    check_index_tensor(*cu_seqlens_k, "cu_seqlens_k", q, /*int32_only=*/true);
    TORCH_CHECK_VALUE(cu_seqlens_q->numel() >= 1 && cu_seqlens_q->numel() == sep.numel() + 1,
                      "mixed_mask_attention: cu_seqlens_q must have shape [n + 1] with n = "
                      "sep.numel() = ", sep.numel(), ", got ", cu_seqlens_q->sizes());
    TORCH_CHECK_VALUE(cu_seqlens_k->sizes() == cu_seqlens_q->sizes(),
                      "mixed_mask_attention: cu_seqlens_k must have the shape of cu_seqlens_q ",
                      cu_seqlens_q->sizes(), ", got ", cu_seqlens_k->sizes());
    TORCH_CHECK_VALUE(max_seqlen_q >= 0 && max_seqlen_k >= 0,
                      "mixed_mask_attention: max_seqlen_q and max_seqlen_k must be >= 0 (0: unknown), got ",
                      max_seqlen_q, " and ", max_seqlen_k);
    args.num_samples = sep.numel();
    args.cu_seqlens_q = cu_seqlens_q->contiguous();
    args.cu_seqlens_k = cu_seqlens_k->contiguous();
    args.max_seqlen_q = max_seqlen_q;
    args.max_seqlen_k = max_seqlen_k;
  } else {
    TORCH_CHECK_VALUE(k.size(0) == q.size(0), "mixed_mask_attention: k must have the batch size of q (",
                      q.size(0), "), got ", k.size(0));
    TORCH_CHECK_VALUE(sep.numel() == q.size(0), "mixed_mask_attention: sep must have shape [batch] = [",
                      q.size(0), "], got ", sep.sizes());
    TORCH_CHECK_VALUE(args.seq_q <= args.seq_k, "mixed_mask_attention: seq_q (", args.seq_q,
                      ") must not exceed seq_k (", args.seq_k,
                      "): queries are the last seq_q of the seq_k positions");
    args.num_samples = q.size(0);
    args.max_seqlen_q = args.seq_q;
    args.max_seqlen_k = args.seq_k;
  }
  args.q = with_contiguous_head_dim(q);
  args.k = with_contiguous_head_dim(k);
  args.v = with_contiguous_head_dim(v);
  args.sep = sep_as_int32(sep);
  args.q_strides = token_strides(args.q);
  args.k_strides = token_strides(args.k);
  args.v_strides = token_strides(args.v);
  return args;
}

MixedMaskAttentionBackwardArgs check_mixed_mask_attention_backward_inputs(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& sep, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale) {
  MixedMaskAttentionBackwardArgs args;
  args.forward = check_mixed_mask_attention_inputs(q, k, v, sep, cu_seqlens_q, cu_seqlens_k,
                                                   max_seqlen_q, max_seqlen_k, softmax_scale);
  const auto& fwd = args.forward;
  check_like(grad_out, "grad_out", q, "q");
  check_like(out, "out", q, "q");
  const auto lse_shape = fwd.lse_shape();
  TORCH_CHECK_TYPE(lse.scalar_type() == fwd.lse_dtype(), "mixed_mask_attention: lse must be ",
                   fwd.lse_dtype(), " for ", q.scalar_type(), " inputs, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q.device(), "mixed_mask_attention: lse must be on the device of q (",
                    q.device(), "), got ", lse.device());
  TORCH_CHECK_VALUE(lse.sizes() == at::IntArrayRef(lse_shape), "mixed_mask_attention: lse must have shape ",
                    at::IntArrayRef(lse_shape), ", got ", lse.sizes());
  if (grad_lse.has_value()) check_like(*grad_lse, "grad_lse", lse, "lse");
  args.grad_out = with_contiguous_head_dim(grad_out);
  args.out = with_contiguous_head_dim(out);
  args.lse = lse.contiguous();
  if (grad_lse.has_value()) args.grad_lse = grad_lse->contiguous();
  args.grad_out_strides = token_strides(args.grad_out);
  args.out_strides = token_strides(args.out);
  return args;
}

std::vector<MixedMaskSample> mixed_mask_attention_samples(const MixedMaskAttentionArgs& args) {
  TORCH_CHECK(args.sep.device().is_cpu() && (!args.packed || args.cu_seqlens_q.device().is_cpu()),
              "mixed_mask_attention_samples reads sep and cu_seqlens on the host");
  std::vector<MixedMaskSample> samples(args.num_samples);
  const int32_t* sep = args.sep.const_data_ptr<int32_t>();
  if (!args.packed) {
    for (int64_t b = 0; b < args.num_samples; ++b) {
      TORCH_CHECK_VALUE(sep[b] >= 0 && sep[b] <= args.seq_k, "mixed_mask_attention: sep must lie in [0, seq_k = ",
                        args.seq_k, "], got sep[", b, "] = ", sep[b]);
      samples[b] = {b, 0, 0, args.seq_q, args.seq_k, sep[b]};
    }
    return samples;
  }
  const int32_t* cu_q = args.cu_seqlens_q.const_data_ptr<int32_t>();
  const int32_t* cu_k = args.cu_seqlens_k.const_data_ptr<int32_t>();
  const int64_t n = args.num_samples;
  for (auto [cu, name, total] : {std::tuple{cu_q, "cu_seqlens_q", args.seq_q},
                                 std::tuple{cu_k, "cu_seqlens_k", args.seq_k}}) {
    bool monotone = cu[0] == 0 && cu[n] == total;
    for (int64_t i = 0; i < n && monotone; ++i) monotone = cu[i + 1] >= cu[i];
    TORCH_CHECK_VALUE(monotone, "mixed_mask_attention: ", name,
                      " must start at 0, never decrease and end at the number of tokens (", total,
                      "), got ", int_list(cu, n + 1));
  }
  for (int64_t i = 0; i < n; ++i) {
    const int64_t len_q = cu_q[i + 1] - cu_q[i], len_k = cu_k[i + 1] - cu_k[i];
    TORCH_CHECK_VALUE(len_q <= len_k, "mixed_mask_attention: sample ", i, " has more queries (", len_q,
                      ") than keys (", len_k, "): queries are the last len_q of the len_k positions");
    TORCH_CHECK_VALUE(sep[i] >= 0 && sep[i] <= len_k, "mixed_mask_attention: sep must lie in [0, L] with L "
                      "the length of its sample, got sep[", i, "] = ", sep[i], " with L = ", len_k);
    TORCH_CHECK_VALUE(args.max_seqlen_q == 0 || len_q <= args.max_seqlen_q, "mixed_mask_attention: sample ",
                      i, " has ", len_q, " queries, more than max_seqlen_q = ", args.max_seqlen_q);
    TORCH_CHECK_VALUE(args.max_seqlen_k == 0 || len_k <= args.max_seqlen_k, "mixed_mask_attention: sample ",
                      i, " has ", len_k, " keys, more than max_seqlen_k = ", args.max_seqlen_k);
    samples[i] = {0, cu_q[i], cu_k[i], len_q, len_k, sep[i]};
  }
  return samples;
}

}  // namespace glm_ext
