// Every op schema of glm_ext, in one place. Kernels register themselves per device next to their
// code (csrc/<family>/cpu/*.cpp for the CPU, csrc/<family>/cuda/*.cu for CUDA, with the family's
// shared argument checks in csrc/<family>/); Python-side autograd and fake kernels live in
// glm_ext/ops.py.
#include <torch/extension.h>
#include <torch/library.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif


#ifndef GLM_EXT_VERSION
#define GLM_EXT_VERSION "unknown"
#endif
#ifndef GLM_EXT_CUDA_ARCHS
#define GLM_EXT_CUDA_ARCHS ""
#endif

TORCH_LIBRARY(glm_ext, m) {
  // 2D position machinery (GLM_SPEC section 3).
  m.def(
      "embedding_2d(Tensor input_ids, Tensor position_ids, Tensor block_position_ids, "
      "Tensor word_weight, Tensor position_weight, Tensor block_position_weight) -> Tensor");
  // Always deterministic: every table row is summed in a fixed order, on every device.
  m.def(
      "embedding_2d_backward(Tensor grad_output, Tensor input_ids, Tensor position_ids, "
      "Tensor block_position_ids, SymInt num_words, SymInt num_positions, "
      "SymInt num_block_positions) -> (Tensor, Tensor, Tensor)");
  m.def(
      "rotary_2d(Tensor x, Tensor position_ids, Tensor block_position_ids, "
      "float base=10000.0) -> Tensor");
  // The inverse rotation; rotary_2d is orthogonal, so this is also its gradient.
  m.def(
      "rotary_2d_backward(Tensor grad_output, Tensor position_ids, Tensor block_position_ids, "
      "float base=10000.0) -> Tensor");

  // Blank-infilling batches (GLM_SPEC section 1). special_ids: [CLS], <eos>, pad, [MASK], [sMASK],
  // [gMASK], <sop>, <eop>. Row i is drawn from the random stream of row row_offset + i of the batch
  // with this seed (the objective from the seed alone). Returns tokens, targets, loss_mask
  // [batch, width], position_ids [batch, 2, width], sep int32 [batch] and the objective drawn for
  // the batch (0 token, 1 sentence, 2 document); width = output_length, or the longest row when 0.
  m.def(
      "span_shuffle_batch(Tensor tokens, Tensor? lengths, Tensor sentence_end_ids, int seed, "
      "float[] objective_probs, float mask_ratio, float poisson_lambda, int max_span_length, "
      "float min_document_ratio, int[] special_ids, int vocab_size, int output_length=0, "
      "int row_offset=0) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // One row from explicit spans [k, 2] and Part B order [k]: tokens, targets, loss_mask,
  // position_ids [2, L] and sep (0-dim).
  m.def(
      "blank_infilling(Tensor tokens, Tensor spans, Tensor order, int mask_id, int sop_id, "
      "int eop_id) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Mixed-mask attention (GLM_SPEC section 2): softmax attention where query i (absolute position
  // seq_k - seq_q + i) sees key j iff j < sep or j <= position; layouts, lse and checks are
  // described in csrc/attention/attention.h. Padded: q [batch, seq_q, heads_q, head_dim], k/v [batch,
  // seq_k, heads_kv, head_dim], sep [batch], cu_seqlens None (max_seqlen ignored). Packed: q
  // [total_q, heads_q, head_dim], k/v [total_k, heads_kv, head_dim], cu_seqlens int32 [n + 1],
  // sep [n]; max_seqlen an upper bound of the sample lengths (0: unknown, the kernel finds it).
  // lse: float32 (float64 for float64 inputs) [batch, heads_q, seq_q] padded, [heads_q, total_q]
  // packed.
  m.def(
      "mixed_mask_attention(Tensor q, Tensor k, Tensor v, Tensor sep, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale) "
      "-> (Tensor out, Tensor lse)");
  // Gradients of q, k, v from grad_out and, when given, grad_lse (the gradient of lse).
  // Deterministic: every element is summed in a fixed order (on the CPU the order may depend on
  // the thread count when there are fewer (sample, kv head) pairs than 4 per thread: it sets how
  // many chunks each sample's keys are cut into).
  m.def(
      "mixed_mask_attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, "
      "Tensor v, Tensor out, Tensor lse, Tensor sep, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "SymInt max_seqlen_q, SymInt max_seqlen_k, float softmax_scale) "
      "-> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}

#ifdef GLM_EXT_WITH_CUDA
namespace glm_ext {
int compiled_cuda_version();  // csrc/common/cuda/build_info.cu
}
#endif

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["version"] = GLM_EXT_VERSION;
  info["torch_version"] = std::to_string(TORCH_VERSION_MAJOR) + "." +
                          std::to_string(TORCH_VERSION_MINOR) + "." +
                          std::to_string(TORCH_VERSION_PATCH);
#ifdef GLM_EXT_WITH_CUDA
  info["cuda"] = true;
  const int version = glm_ext::compiled_cuda_version();
  info["cuda_version"] = std::to_string(version / 1000) + "." + std::to_string((version % 1000) / 10);
#else
  info["cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["cuda_archs"] = GLM_EXT_CUDA_ARCHS;
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "glm_ext compiled ops (registered under torch.ops.glm_ext)";
  module.def("build_info", &build_info,
             "How this extension was built: version, torch, CUDA and its architectures.");
}
