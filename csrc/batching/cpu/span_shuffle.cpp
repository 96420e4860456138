// CPU kernels of the span-shuffle batching ops: rows in parallel, each row by the shared per-row
// algorithm of span_shuffle.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "batching/batching.h"

namespace glm_ext {
namespace {

using namespace span_shuffle;

void sample_rows_cpu(SpanShuffleBatch& batch) {
  const int64_t max_len = batch.tokens.size(1);
  const int64_t ws_ints = batch.workspace.size(1);
  const int64_t* tokens = batch.tokens.data_ptr<int64_t>();
  const int32_t* lengths = batch.lengths.data_ptr<int32_t>();
  int32_t* workspace = batch.workspace.data_ptr<int32_t>();
  int32_t* status = batch.status.data_ptr<int32_t>();
  int32_t* num_spans = batch.num_spans.data_ptr<int32_t>();
  int32_t* row_length = batch.row_length.data_ptr<int32_t>();
  const bool document = batch.objective == kDocumentLevel;
  at::parallel_for(0, batch.tokens.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      RowWorkspace ws(workspace + row * ws_ints, max_len);
      status[row] = sample_row(tokens + row * max_len, lengths[row], batch.objective, batch.params,
                               static_cast<uint64_t>(row), ws);
      num_spans[row] = ws.count;
      row_length[row] = assembled_length(lengths[row], ws.count, document);
    }
  });
}

void assemble_rows_cpu(const SpanShuffleBatch& batch, int64_t width, at::Tensor& tokens,
                       at::Tensor& targets, at::Tensor& loss_mask, at::Tensor& positions,
                       at::Tensor& sep) {
  const int64_t max_len = batch.tokens.size(1);
  const int64_t ws_ints = batch.workspace.size(1);
  const int64_t* rows = batch.tokens.data_ptr<int64_t>();
  const int32_t* lengths = batch.lengths.data_ptr<int32_t>();
  int32_t* workspace = batch.workspace.data_ptr<int32_t>();
  const int32_t* num_spans = batch.num_spans.data_ptr<int32_t>();
  int64_t* out_tokens = tokens.data_ptr<int64_t>();
  int64_t* out_targets = targets.data_ptr<int64_t>();
  int64_t* out_loss = loss_mask.data_ptr<int64_t>();
  int64_t* out_positions = positions.data_ptr<int64_t>();
  int32_t* out_sep = sep.data_ptr<int32_t>();
  const bool document = batch.objective == kDocumentLevel;
  at::parallel_for(0, batch.tokens.size(0), 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      RowWorkspace ws(workspace + row * ws_ints, max_len);
      const int64_t o = row * width;
      out_sep[row] = assemble_row(rows + row * max_len, lengths[row], ws.start, ws.end, ws.order,
                                  num_spans[row], batch.mask_token, document, batch.params,
                                  static_cast<int32_t>(width), out_tokens + o, out_targets + o,
                                  out_loss + o, out_positions + 2 * o, out_positions + 2 * o + width,
                                  ws.lengths);
    }
  });
}

SpanShuffleOutputs span_shuffle_batch_cpu(
    const at::Tensor& tokens, const std::optional<at::Tensor>& lengths,
    const at::Tensor& sentence_end_ids, int64_t seed, at::ArrayRef<double> objective_probs,
    double mask_ratio, double poisson_lambda, int64_t max_span_length, double min_document_ratio,
    at::IntArrayRef special_ids, int64_t vocab_size, int64_t output_length, int64_t row_offset) {
  return run_span_shuffle_batch({&sample_rows_cpu, &assemble_rows_cpu}, tokens, lengths,
                                sentence_end_ids, seed, objective_probs, mask_ratio, poisson_lambda,
                                max_span_length, min_document_ratio, special_ids, vocab_size, output_length,
                                row_offset);
}

// One row from explicit spans and Part B order (glm_ext.data.blank_infilling).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> blank_infilling_cpu(
    const at::Tensor& tokens, const at::Tensor& spans, const at::Tensor& order, int64_t mask_id,
    int64_t sop_id, int64_t eop_id) {
  TORCH_CHECK_TYPE(!tokens.is_floating_point() && !spans.is_floating_point() && !order.is_floating_point(),
                   "tokens, spans and order must be integer tensors");
  TORCH_CHECK_VALUE(tokens.dim() == 1, "tokens must be 1-D, got shape ", tokens.sizes());
  TORCH_CHECK_VALUE(spans.dim() == 2 && spans.size(1) == 2, "spans must be [num_spans, 2], got shape ",
                    spans.sizes());
  const int64_t n = tokens.size(0), count = spans.size(0);
  TORCH_CHECK_VALUE(order.dim() == 1 && order.size(0) == count, "order must have shape [", count,
                    "], got ", order.sizes());
  for (auto [t, name] : {std::pair{&spans, "spans"}, std::pair{&order, "order"}}) {
    TORCH_CHECK_VALUE(t->device() == tokens.device(), name, " must be on the device of tokens (",
                      tokens.device(), "), got ", t->device());
  }
  TORCH_CHECK_VALUE(n <= (int64_t{1} << 29), "tokens: rows longer than 2^29 tokens are not supported, got ", n);
  const auto row = tokens.to(at::kLong).contiguous();
  // Values are checked as int64, then narrowed: nothing out of range can wrap into range.
  const auto span_values = spans.to(at::kLong).contiguous();
  const auto order_values = order.to(at::kLong).contiguous();
  const int64_t* sv = span_values.const_data_ptr<int64_t>();
  const int64_t* ov = order_values.const_data_ptr<int64_t>();
  std::vector<int32_t> start(count), end(count), order32(count), position(count);
  std::vector<bool> seen(count, false);
  for (int64_t s = 0; s < count; ++s) {
    const int64_t a = sv[2 * s], b = sv[2 * s + 1], k = ov[s];
    TORCH_CHECK_VALUE(0 <= a && a < b && b <= n, "span ", s, " = [", a, ", ", b,
                      ") must be non-empty and inside the row [0, ", n, ")");
    TORCH_CHECK_VALUE(s == 0 || a >= end[s - 1], "spans must be in text order and must not overlap; span ",
                      s, " starts at ", a, " before span ", s - 1, " ends at ", end[s - 1]);
    TORCH_CHECK_VALUE(0 <= k && k < count && !seen[k], "order must be a permutation of 0..", count - 1,
                      ", got ", k, " at index ", s);
    start[s] = static_cast<int32_t>(a);
    end[s] = static_cast<int32_t>(b);
    order32[s] = static_cast<int32_t>(k);
    seen[k] = true;
  }
  const int64_t width = assembled_length(static_cast<int32_t>(n), static_cast<int32_t>(count), false);
  auto options = tokens.options().dtype(at::kLong);
  auto out_tokens = at::empty({width}, options), targets = at::empty({width}, options);
  auto loss_mask = at::empty({width}, options), positions = at::empty({2, width}, options);
  Params params{};
  params.sop_id = sop_id;
  params.eop_id = eop_id;
  const int32_t sep = assemble_row(
      row.data_ptr<int64_t>(), static_cast<int32_t>(n), start.data(), end.data(),
      order32.data(), static_cast<int32_t>(count), mask_id, false, params,
      static_cast<int32_t>(width), out_tokens.data_ptr<int64_t>(), targets.data_ptr<int64_t>(),
      loss_mask.data_ptr<int64_t>(), positions.data_ptr<int64_t>(),
      positions.data_ptr<int64_t>() + width, position.data());
  return {out_tokens, targets, loss_mask, positions, at::scalar_tensor(sep, options)};
}

}  // namespace

TORCH_LIBRARY_IMPL(glm_ext, CPU, m) {
  m.impl("span_shuffle_batch", &span_shuffle_batch_cpu);
  m.impl("blank_infilling", &blank_infilling_cpu);
}

}  // namespace glm_ext
