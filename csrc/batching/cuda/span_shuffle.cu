// CUDA entry point of span_shuffle_batch, for batches that already live on the GPU: the host driver
// of batching.h with the kernels of span_shuffle_kernels.cuh (one thread per row; batches are tens
// to hundreds of rows, which keeps this a small, launch-bound kernel).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "batching/batching.h"
#include "batching/cuda/span_shuffle_kernels.cuh"

namespace glm_ext {
namespace {

using namespace span_shuffle;
using cuda::span_shuffle_kernels::assemble_rows_kernel;
using cuda::span_shuffle_kernels::kRowsPerBlock;
using cuda::span_shuffle_kernels::sample_rows_kernel;

unsigned int blocks_for(int64_t rows) {
  return static_cast<unsigned int>((rows + kRowsPerBlock - 1) / kRowsPerBlock);
}

void sample_rows_cuda(SpanShuffleBatch& batch) {
  const int64_t batch_size = batch.tokens.size(0);
  sample_rows_kernel<<<blocks_for(batch_size), kRowsPerBlock, 0,
                       at::cuda::getCurrentCUDAStream()>>>(
      batch.tokens.data_ptr<int64_t>(), batch.lengths.data_ptr<int32_t>(), batch_size,
      batch.tokens.size(1), batch.workspace.size(1), batch.objective, batch.params,
      batch.workspace.data_ptr<int32_t>(), batch.status.data_ptr<int32_t>(),
      batch.num_spans.data_ptr<int32_t>(), batch.row_length.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void assemble_rows_cuda(const SpanShuffleBatch& batch, int64_t width, at::Tensor& tokens,
                        at::Tensor& targets, at::Tensor& loss_mask, at::Tensor& positions,
                        at::Tensor& sep) {
  const int64_t batch_size = batch.tokens.size(0);
  assemble_rows_kernel<<<blocks_for(batch_size), kRowsPerBlock, 0,
                         at::cuda::getCurrentCUDAStream()>>>(
      batch.tokens.data_ptr<int64_t>(), batch.lengths.data_ptr<int32_t>(), batch_size,
      batch.tokens.size(1), batch.workspace.size(1), batch.workspace.data_ptr<int32_t>(),
      batch.num_spans.data_ptr<int32_t>(), batch.mask_token,
      batch.objective == kDocumentLevel, batch.params, width, tokens.data_ptr<int64_t>(),
      targets.data_ptr<int64_t>(), loss_mask.data_ptr<int64_t>(), positions.data_ptr<int64_t>(),
      sep.data_ptr<int32_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

SpanShuffleOutputs span_shuffle_batch_cuda(
    const at::Tensor& tokens, const std::optional<at::Tensor>& lengths,
    const at::Tensor& sentence_end_ids, int64_t seed, at::ArrayRef<double> objective_probs,
    double mask_ratio, double poisson_lambda, int64_t max_span_length, double min_document_ratio,
    at::IntArrayRef special_ids, int64_t vocab_size, int64_t output_length, int64_t row_offset) {
  const c10::cuda::CUDAGuard device_guard(tokens.device());
  return run_span_shuffle_batch({&sample_rows_cuda, &assemble_rows_cuda}, tokens, lengths,
                                sentence_end_ids, seed, objective_probs, mask_ratio, poisson_lambda,
                                max_span_length, min_document_ratio, special_ids, vocab_size, output_length,
                                row_offset);
}

}  // namespace

TORCH_LIBRARY_IMPL(glm_ext, CUDA, m) { m.impl("span_shuffle_batch", &span_shuffle_batch_cuda); }

}  // namespace glm_ext
