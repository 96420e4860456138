// Host-side set-up shared by the CUDA entry points (mixed_mask_attention.cu) and the CPU
// emulation harness of the kernels (python_tests/flash_emulator): kernel parameters from the
// checked arguments and the dispatch over the kernels' instantiations. Host code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>

#include "attention/attention.h"
#include "flash_params.h"

namespace glm_ext::cuda::flash {

// cp.async and the 16-byte stores move whole rows: a tensor whose rows are not 16-byte aligned is
// copied into fresh (aligned) memory first; clone, since contiguous() returns a contiguous tensor
// at an odd storage offset as it is.
inline at::Tensor with_aligned_rows(const at::Tensor& t) {
  bool aligned = reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) aligned = aligned && (t.size(d) <= 1 || t.stride(d) % 8 == 0);
  return aligned ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Everything but the outputs (out, lse) from the checked arguments and the (aligned) q, k, v.
inline ForwardParams forward_params(const MixedMaskAttentionArgs& args, const at::Tensor& q, const at::Tensor& k,
                                    const at::Tensor& v) {
  ForwardParams p;
  p.q = q.const_data_ptr();
  p.k = k.const_data_ptr();
  p.v = v.const_data_ptr();
  p.q_strides = token_strides(q);
  p.k_strides = token_strides(k);
  p.v_strides = token_strides(v);
  p.lse_strides = args.lse_strides();
  p.sep = args.sep.const_data_ptr<int32_t>();
  if (args.packed) {
    p.cu_seqlens_q = args.cu_seqlens_q.const_data_ptr<int32_t>();
    p.cu_seqlens_k = args.cu_seqlens_k.const_data_ptr<int32_t>();
  }
  p.num_samples = static_cast<int>(args.num_samples);
  p.seq_q = args.seq_q;
  p.seq_k = args.seq_k;
  p.heads_q = static_cast<int>(args.heads_q);
  p.heads_kv = static_cast<int>(args.heads_kv);
  p.softmax_scale = static_cast<float>(args.softmax_scale);
  p.scale_log2 = static_cast<float>(args.softmax_scale * M_LOG2E);
  return p;
}

// The backward's parameters, with out and grad_out aligned like q, k, v; the gradients and delta
// are left to the caller.
inline BackwardParams backward_params(const MixedMaskAttentionBackwardArgs& args, const at::Tensor& q,
                                      const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
                                      const at::Tensor& grad_out) {
  BackwardParams p;
  static_cast<ForwardParams&>(p) = forward_params(args.forward, q, k, v);
  p.out = const_cast<void*>(out.const_data_ptr());  // read only: the delta pass
  p.out_strides = token_strides(out);
  p.lse = const_cast<float*>(args.lse.const_data_ptr<float>());  // read only
  p.grad_out = grad_out.const_data_ptr();
  p.grad_out_strides = token_strides(grad_out);
  p.grad_lse = args.grad_lse.defined() ? args.grad_lse.const_data_ptr<float>() : nullptr;
  return p;
}

// Where the forward writes: out (like q) and lse (contiguous, lse_shape()).
inline void set_outputs(ForwardParams& p, const at::Tensor& out, const at::Tensor& lse) {
  p.out = out.data_ptr();
  p.out_strides = token_strides(out);
  p.lse = lse.data_ptr<float>();
}

// Where the backward writes: the gradients (like q, k, v) and its delta buffer (like lse).
inline void set_gradients(BackwardParams& p, const at::Tensor& grad_q, const at::Tensor& grad_k,
                          const at::Tensor& grad_v, const at::Tensor& delta) {
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  p.grad_q_strides = token_strides(grad_q);
  p.grad_k_strides = token_strides(grad_k);
  p.grad_v_strides = token_strides(grad_v);
  p.delta = delta.data_ptr<float>();
}

// The grid bounds of the query and key lengths: max_seqlen when given, else the token totals.
// A max_seqlen above the total is clamped to it (no sample is longer): a grid sized by a huge
// value would overflow its 32-bit block count and leave outputs unwritten.
inline std::pair<int64_t, int64_t> length_bounds(const MixedMaskAttentionArgs& args) {
  auto bound = [](int64_t max_seqlen, int64_t total) { return max_seqlen > 0 ? std::min(max_seqlen, total) : total; };
  return {bound(args.max_seqlen_q, args.seq_q), bound(args.max_seqlen_k, args.seq_k)};
}

// Calls f.template operator()<T, D>() for the element type and head dimension of args, which
// check_cuda_support (or the caller) has restricted to float16 / bfloat16 and 64 / 128.
template <typename F>
void dispatch(const MixedMaskAttentionArgs& args, F&& f) {
  const bool half = args.q.scalar_type() == at::kHalf;
  if (args.head_dim == 64) {
    half ? f.template operator()<__half, 64>() : f.template operator()<__nv_bfloat16, 64>();
  } else {
    half ? f.template operator()<__half, 128>() : f.template operator()<__nv_bfloat16, 128>();
  }
}

}  // namespace glm_ext::cuda::flash
