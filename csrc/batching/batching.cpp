#include "batching/batching.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <string>

namespace glm_ext {
namespace {

using namespace span_shuffle;

constexpr int64_t kMaxSpanLengthLimit = 4096;
// Rows are indexed with int32: an assembled row (at most 3x its input) must fit.
constexpr int64_t kMaxRowLength = int64_t{1} << 29;
constexpr int32_t kMaxAttempts = 16;

void check_probability(double value, const char* name, bool allow_zero) {
  TORCH_CHECK_VALUE(std::isfinite(value) && (allow_zero ? value >= 0 : value > 0) && value <= 1,
                    name, " must lie in ", allow_zero ? "[0, 1]" : "(0, 1]", ", got ", value);
}

int32_t choose_objective(at::ArrayRef<double> probs, uint64_t seed) {
  Pcg32 rng(seed, kObjectiveStream);
  const double u = rng.uniform();
  if (u < probs[0]) return kTokenLevel;
  if (u < probs[0] + probs[1]) return kSentenceLevel;
  return kDocumentLevel;
}

std::string row_error(int64_t row, int32_t status, int64_t length, int32_t objective,
                      int64_t needed, int64_t output_length, int64_t vocab_size) {
  const std::string where = "span_shuffle_batch: row " + std::to_string(row) + " (length " +
                            std::to_string(length) + ") ";
  switch (status) {
    case kNoMaskableToken:
      return where + "has no token that may be masked (only [CLS]/<eos>)";
    case kTooShortForDocument:
      return where + "is too short for the document-level objective (needs at least 3 tokens)";
    case kTokenOutOfRange:
      return where + "holds token ids outside [0, vocab_size=" + std::to_string(vocab_size) + ")";
    case kOutputTooLong:
      return where + "assembles to " + std::to_string(needed) + " tokens, more than output_length=" +
             std::to_string(output_length);
    default:
      return where + "failed with status " + std::to_string(status) + " (objective " +
             std::to_string(objective) + ")";
  }
}

}  // namespace

SpanShuffleOutputs run_span_shuffle_batch(
    const SpanShuffleKernels& kernels, const at::Tensor& tokens,
    const std::optional<at::Tensor>& lengths, const at::Tensor& sentence_end_ids, int64_t seed,
    at::ArrayRef<double> objective_probs, double mask_ratio, double poisson_lambda,
    int64_t max_span_length, double min_document_ratio, at::IntArrayRef special_ids,
    int64_t vocab_size, int64_t output_length, int64_t row_offset) {
  // ---- arguments
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kLong || tokens.scalar_type() == at::kInt,
                   "tokens must be int32 or int64, got ", tokens.scalar_type());
  TORCH_CHECK_VALUE(tokens.dim() == 2, "tokens must be a 2-D batch [batch, length], got shape ",
                    tokens.sizes());
  TORCH_CHECK_VALUE(tokens.size(1) <= kMaxRowLength, "tokens: rows longer than ", kMaxRowLength,
                    " tokens are not supported, got ", tokens.size(1));
  TORCH_CHECK_VALUE(vocab_size > 0, "vocab_size must be positive, got ", vocab_size);
  TORCH_CHECK_VALUE(special_ids.size() == kNumSpecialIds,
                    "special_ids must hold 8 ids ([CLS], <eos>, pad, [MASK], [sMASK], [gMASK], <sop>, <eop>), got ",
                    special_ids.size());
  constexpr const char* kSpecialNames[] = {"cls", "eos", "pad", "mask", "smask", "gmask", "sop", "eop"};
  for (int i = 0; i < kNumSpecialIds; ++i) {
    TORCH_CHECK_VALUE(special_ids[i] >= 0 && special_ids[i] < vocab_size, "special_ids: the ", kSpecialNames[i],
                      " id must lie in [0, vocab_size=", vocab_size, "), got ", special_ids[i]);
  }
  check_probability(mask_ratio, "mask_ratio", /*allow_zero=*/false);
  check_probability(min_document_ratio, "min_document_ratio", /*allow_zero=*/true);
  TORCH_CHECK_VALUE(std::isfinite(poisson_lambda) && poisson_lambda > 0,
                    "poisson_lambda must be a positive number, got ", poisson_lambda);
  TORCH_CHECK_VALUE(max_span_length >= 1 && max_span_length <= kMaxSpanLengthLimit,
                    "max_span_length must lie in [1, ", kMaxSpanLengthLimit, "], got ", max_span_length);
  TORCH_CHECK_VALUE(objective_probs.size() == 3,
                    "objective_probs must hold 3 probabilities (token, sentence, document), got ",
                    objective_probs.size());
  double total = 0;
  for (double prob : objective_probs) {
    check_probability(prob, "each of objective_probs", /*allow_zero=*/true);
    total += prob;
  }
  TORCH_CHECK_VALUE(std::abs(total - 1.0) < 1e-6, "objective_probs must sum to 1, got ", total);
  TORCH_CHECK_VALUE(output_length >= 0 && output_length <= 3 * kMaxRowLength,
                    "output_length must lie in [0, ", 3 * kMaxRowLength, "] (0: the longest row), got ",
                    output_length);
  TORCH_CHECK_TYPE(sentence_end_ids.scalar_type() == at::kLong || sentence_end_ids.scalar_type() == at::kInt,
                   "sentence_end_ids must be int32 or int64, got ", sentence_end_ids.scalar_type());
  TORCH_CHECK_VALUE(sentence_end_ids.dim() == 1, "sentence_end_ids must be 1-D, got shape ",
                    sentence_end_ids.sizes());
  TORCH_CHECK_VALUE(sentence_end_ids.device() == tokens.device(),
                    "sentence_end_ids must be on the device of tokens (", tokens.device(), "), got ",
                    sentence_end_ids.device());

  const int64_t batch_size = tokens.size(0), max_len = tokens.size(1);
  // Row streams stay below the objective's stream.
  TORCH_CHECK_VALUE(row_offset >= 0 && static_cast<uint64_t>(row_offset) <= kObjectiveStream - batch_size,
                    "row_offset must lie in [0, 2^63 - 1 - batch], got ", row_offset);
  const auto device = tokens.device();
  at::Tensor row_lengths;
  if (lengths.has_value()) {
    TORCH_CHECK_TYPE(lengths->scalar_type() == at::kLong || lengths->scalar_type() == at::kInt,
                     "lengths must be int32 or int64, got ", lengths->scalar_type());
    TORCH_CHECK_VALUE(lengths->dim() == 1 && lengths->size(0) == batch_size,
                      "lengths must have shape [", batch_size, "], got ", lengths->sizes());
    TORCH_CHECK_VALUE(lengths->device() == device, "lengths must be on the device of tokens (",
                      device, "), got ", lengths->device());
    if (batch_size > 0) {  // checked before the values are narrowed to int32
      const auto bounds = at::stack({lengths->min(), lengths->max()}).to(at::kCPU, at::kLong);
      const int64_t low = bounds[0].item<int64_t>(), high = bounds[1].item<int64_t>();
      TORCH_CHECK_VALUE(low >= 0 && high <= max_len, "lengths must lie in [0, tokens.size(1)=", max_len,
                        "], got values in [", low, ", ", high, "]");
    }
    row_lengths = lengths->to(at::kInt).contiguous();
  } else {
    row_lengths = at::full({batch_size}, max_len, tokens.options().dtype(at::kInt));
  }
  TORCH_CHECK_VALUE(sentence_end_ids.numel() == 0 ||
                        (sentence_end_ids.min().item<int64_t>() >= 0 &&
                         sentence_end_ids.max().item<int64_t>() < vocab_size),
                    "sentence_end_ids must lie in [0, vocab_size=", vocab_size, ")");

  SpanShuffleBatch batch;
  batch.tokens = tokens.to(at::kLong).contiguous();
  batch.lengths = row_lengths;
  auto cdf = at::empty({max_span_length}, at::dtype(at::kDouble));
  span_length_cdf(poisson_lambda, static_cast<int32_t>(max_span_length), cdf.mutable_data_ptr<double>());
  batch.span_cdf = cdf.to(device);
  batch.sentence_end_ids = std::get<0>(sentence_end_ids.to(device, at::kLong).sort()).contiguous();
  batch.objective = choose_objective(objective_probs, static_cast<uint64_t>(seed));
  batch.mask_token = special_ids[batch.objective == kTokenLevel      ? kMask
                                 : batch.objective == kSentenceLevel ? kSmask
                                                                     : kGmask];
  batch.params = Params{vocab_size, special_ids[kCls], special_ids[kEos], special_ids[kPad], special_ids[kMask],
                        special_ids[kSmask], special_ids[kGmask], special_ids[kSop], special_ids[kEop],
                        mask_ratio, batch.span_cdf.data_ptr<double>(),
                        static_cast<int32_t>(max_span_length), min_document_ratio,
                        batch.sentence_end_ids.data_ptr<int64_t>(),
                        static_cast<int32_t>(batch.sentence_end_ids.numel()),
                        static_cast<uint64_t>(seed), kMaxAttempts, static_cast<uint64_t>(row_offset)};
  const auto int_options = tokens.options().dtype(at::kInt);
  batch.workspace = at::empty({batch_size, RowWorkspace::workspace_ints(max_len)}, int_options);
  batch.status = at::empty({batch_size}, int_options);
  batch.num_spans = at::empty({batch_size}, int_options);
  batch.row_length = at::empty({batch_size}, int_options);

  // ---- pass 1: spans of every row
  if (batch_size > 0) kernels.sample(batch);
  const auto status_cpu = batch.status.cpu(), row_length_cpu = batch.row_length.cpu();
  const auto input_length_cpu = batch.lengths.cpu();
  const auto status = status_cpu.accessor<int32_t, 1>();
  const auto row_length = row_length_cpu.accessor<int32_t, 1>();
  const auto input_length = input_length_cpu.accessor<int32_t, 1>();
  int64_t width = output_length;
  for (int64_t row = 0; row < batch_size; ++row) {
    const int64_t needed = row_length[row];
    const int32_t reported = status[row] == kOk && output_length > 0 && needed > output_length
                                 ? static_cast<int32_t>(kOutputTooLong) : status[row];
    TORCH_CHECK_VALUE(reported == kOk, row_error(row, reported, input_length[row], batch.objective,
                                                 needed, output_length, vocab_size));
    if (output_length == 0) width = std::max(width, needed);
  }

  // ---- pass 2: the rows at the batch's width
  const auto long_options = tokens.options().dtype(at::kLong);
  auto out_tokens = at::empty({batch_size, width}, long_options);
  auto targets = at::empty({batch_size, width}, long_options);
  auto loss_mask = at::empty({batch_size, width}, long_options);
  auto positions = at::empty({batch_size, 2, width}, long_options);
  auto sep = at::empty({batch_size}, int_options);
  if (batch_size > 0) kernels.assemble(batch, width, out_tokens, targets, loss_mask, positions, sep);  // sep even at width 0
  auto objective = at::full({}, batch.objective, long_options);
  return {out_tokens, targets, loss_mask, positions, sep, objective};
}

}  // namespace glm_ext
