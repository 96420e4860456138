// Host side of span-shuffle batching, shared by the CPU and CUDA kernels: argument checks, the
// per-batch parameters, and the two-pass driver (sample every row's spans, then assemble the rows
// at the batch's width). The per-row algorithm itself is in span_shuffle.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

#include "batching/span_shuffle.h"

namespace glm_ext {

// Everything a device's two passes read and write.
struct SpanShuffleBatch {
  span_shuffle::Params params;  // pointers refer to span_cdf / sentence_end_ids below
  int32_t objective;
  int64_t mask_token;
  at::Tensor tokens;            // [batch, max_len] int64, contiguous, on the device
  at::Tensor lengths;           // [batch] int32 on the device
  at::Tensor span_cdf;          // float64 on the device
  at::Tensor sentence_end_ids;  // sorted int64 on the device
  // Filled by the sample pass: per row its workspace, status, span count and assembled length.
  at::Tensor workspace;         // [batch, RowWorkspace::workspace_ints(max_len)] int32
  at::Tensor status;            // [batch] int32
  at::Tensor num_spans;         // [batch] int32
  at::Tensor row_length;        // [batch] int32
};

using SpanShuffleOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// A device's passes: `sample` fills status, num_spans, row_length and the workspace; `assemble`
// writes the rows at `width` into tokens/targets/loss_mask [batch, width], positions
// [batch, 2, width] and sep [batch].
struct SpanShuffleKernels {
  void (*sample)(SpanShuffleBatch& batch);
  void (*assemble)(const SpanShuffleBatch& batch, int64_t width, at::Tensor& tokens,
                   at::Tensor& targets, at::Tensor& loss_mask, at::Tensor& positions,
                   at::Tensor& sep);
};

// The order of span_shuffle_batch's special_ids.
enum SpecialId : int { kCls, kEos, kPad, kMask, kSmask, kGmask, kSop, kEop, kNumSpecialIds };

// The op's arguments as the schema has them (csrc/registration.cpp), checked here for every device.
SpanShuffleOutputs run_span_shuffle_batch(
    const SpanShuffleKernels& kernels, const at::Tensor& tokens,
    const std::optional<at::Tensor>& lengths, const at::Tensor& sentence_end_ids, int64_t seed,
    at::ArrayRef<double> objective_probs, double mask_ratio, double poisson_lambda,
    int64_t max_span_length, double min_document_ratio, at::IntArrayRef special_ids,
    int64_t vocab_size, int64_t output_length, int64_t row_offset);

}  // namespace glm_ext
