#include "position/position_ops.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace glm_ext {
namespace {

bool is_index_dtype(at::ScalarType t) { return t == at::kLong || t == at::kInt; }

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

void check_ids(const at::Tensor& ids, const char* name, const at::Tensor& like,
               const char* like_name) {
  TORCH_CHECK_TYPE(is_index_dtype(ids.scalar_type()), name, " must be int32 or int64, got ",
              ids.scalar_type());
  TORCH_CHECK_VALUE(ids.device() == like.device(), name, " must be on the device of ", like_name,
              " (", like.device(), "), got ", ids.device());
  TORCH_CHECK_VALUE(ids.sizes() == like.sizes(), name, " must have the shape of ", like_name, " ",
              like.sizes(), ", got ", ids.sizes());
}

// Ids of mixed integer dtypes are promoted to int64 so that kernels take one index type.
Embedding2dIds contiguous_ids(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  const bool same = a.scalar_type() == b.scalar_type() && a.scalar_type() == c.scalar_type();
  auto prep = [&](const at::Tensor& t) {
    return same ? t.contiguous() : t.to(at::kLong).contiguous();
  };
  return {prep(a), prep(b), prep(c)};
}

void check_table(const at::Tensor& table, const char* name, const at::Tensor& ids,
                 const at::Tensor& word_weight) {
  TORCH_CHECK_VALUE(table.dim() == 2, name, " must be a 2-D table [rows, hidden], got shape ",
              table.sizes());
  TORCH_CHECK_TYPE(is_supported_float(table.scalar_type()), name,
              " must be float32, float16, bfloat16 or float64, got ", table.scalar_type());
  TORCH_CHECK_VALUE(table.device() == ids.device(), name, " must be on the device of input_ids (",
              ids.device(), "), got ", table.device());
  TORCH_CHECK_TYPE(table.scalar_type() == word_weight.scalar_type(), name,
              " must have the dtype of word_weight (", word_weight.scalar_type(), "), got ",
              table.scalar_type());
  TORCH_CHECK_VALUE(table.size(1) == word_weight.size(1), name,
              " must have the hidden size of word_weight (", word_weight.size(1), "), got ",
              table.size(1));
  TORCH_CHECK_VALUE(table.size(0) > 0, name, " must have at least one row");
}

}  // namespace

Embedding2dIds check_embedding_2d_inputs(const at::Tensor& input_ids,
                                         const at::Tensor& position_ids,
                                         const at::Tensor& block_position_ids,
                                         const at::Tensor& word_weight,
                                         const at::Tensor& position_weight,
                                         const at::Tensor& block_position_weight) {
  check_ids(input_ids, "input_ids", input_ids, "input_ids");
  check_ids(position_ids, "position_ids", input_ids, "input_ids");
  check_ids(block_position_ids, "block_position_ids", input_ids, "input_ids");
  check_table(word_weight, "word_weight", input_ids, word_weight);
  check_table(position_weight, "position_weight", input_ids, word_weight);
  check_table(block_position_weight, "block_position_weight", input_ids, word_weight);
  return contiguous_ids(input_ids, position_ids, block_position_ids);
}

Embedding2dIds check_embedding_2d_backward_inputs(const at::Tensor& grad_output,
                                                  const at::Tensor& input_ids,
                                                  const at::Tensor& position_ids,
                                                  const at::Tensor& block_position_ids,
                                                  int64_t num_words, int64_t num_positions,
                                                  int64_t num_block_positions) {
  check_ids(input_ids, "input_ids", input_ids, "input_ids");
  check_ids(position_ids, "position_ids", input_ids, "input_ids");
  check_ids(block_position_ids, "block_position_ids", input_ids, "input_ids");
  TORCH_CHECK_TYPE(is_supported_float(grad_output.scalar_type()),
              "grad_output must be float32, float16, bfloat16 or float64, got ",
              grad_output.scalar_type());
  TORCH_CHECK_VALUE(grad_output.device() == input_ids.device(),
              "grad_output must be on the device of input_ids (", input_ids.device(),
              "), got ", grad_output.device());
  TORCH_CHECK_VALUE(grad_output.dim() == input_ids.dim() + 1 &&
                  grad_output.sizes().slice(0, input_ids.dim()) == input_ids.sizes(),
              "grad_output must have shape [*input_ids.shape, hidden] with input_ids.shape = ",
              input_ids.sizes(), ", got ", grad_output.sizes());
  TORCH_CHECK_VALUE(num_words > 0 && num_positions > 0 && num_block_positions > 0,
              "embedding_2d_backward: table row counts must be positive, got num_words=",
              num_words, ", num_positions=", num_positions,
              ", num_block_positions=", num_block_positions);
  return contiguous_ids(input_ids, position_ids, block_position_ids);
}

Rotary2dArgs check_rotary_2d_inputs(const at::Tensor& x, const at::Tensor& position_ids,
                                    const at::Tensor& block_position_ids, double base,
                                    const char* x_name) {
  TORCH_CHECK_VALUE(x.dim() == 4 || x.dim() == 3, x_name,
              " must be [batch, seq, heads, head_dim] or [tokens, heads, head_dim], got shape ",
              x.sizes());
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), x_name,
              " must be float32, float16, bfloat16 or float64, got ", x.scalar_type());
  const int64_t head_dim = x.size(-1);
  TORCH_CHECK_VALUE(head_dim > 0 && head_dim % 4 == 0, x_name,
              ": head_dim must be a positive multiple of 4 (each half is rotated as pairs), got ",
              head_dim);
  TORCH_CHECK_VALUE(std::isfinite(base) && base > 0, "base must be a positive finite number, got ",
              base);
  const auto id_shape = x.sizes().slice(0, x.dim() - 2);
  for (auto [ids, name] : {std::pair{&position_ids, "position_ids"},
                           std::pair{&block_position_ids, "block_position_ids"}}) {
    TORCH_CHECK_TYPE(is_index_dtype(ids->scalar_type()), name, " must be int32 or int64, got ",
                ids->scalar_type());
    TORCH_CHECK_VALUE(ids->device() == x.device(), name, " must be on the device of ", x_name,
                " (", x.device(), "), got ", ids->device());
    TORCH_CHECK_VALUE(ids->sizes() == id_shape, name, " must have shape ", id_shape, " (", x_name,
                ".shape[:-2]), got ", ids->sizes());
  }
  Rotary2dArgs args;
  args.x = x.stride(-1) == 1 ? x : x.contiguous();
  args.position_ids = position_ids.to(at::kLong).contiguous().view(-1);
  args.block_position_ids = block_position_ids.to(at::kLong).contiguous().view(-1);
  const bool packed = x.dim() == 3;
  args.batch = packed ? 1 : x.size(0);
  args.seq = x.size(-3);
  args.heads = x.size(-2);
  args.head_dim = head_dim;
  args.x_strides = token_strides(args.x);
  return args;
}

}  // namespace glm_ext
