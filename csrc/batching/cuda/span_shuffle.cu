// CUDA variant of span_shuffle_batch, for batches that already live on the GPU. The per-row
// algorithm is span_shuffle.h's, shared with the CPU kernel, so the same seed gives the same batch
// on both devices. A row is sequential work (sampling, then assembly), so one thread takes one
// row; batches are tens to hundreds of rows, which keeps this a small, launch-bound kernel.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "batching/batching.h"

namespace glm_ext {
namespace {

using namespace span_shuffle;

constexpr int kThreadsPerBlock = 64;

__global__ void sample_rows_kernel(const int64_t* __restrict__ tokens,
                                   const int32_t* __restrict__ lengths, int64_t batch_size,
                                   int64_t max_len, int64_t ws_ints, int32_t objective,
                                   Params params, int32_t* workspace, int32_t* status,
                                   int32_t* num_spans, int32_t* row_length) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= batch_size) return;
  RowWorkspace ws(workspace + row * ws_ints, max_len);
  status[row] = sample_row(tokens + row * max_len, lengths[row], objective, params,
                           static_cast<uint64_t>(row), ws);
  num_spans[row] = ws.count;
  row_length[row] = assembled_length(lengths[row], ws.count, objective == kDocumentLevel);
}

__global__ void assemble_rows_kernel(const int64_t* __restrict__ rows,
                                     const int32_t* __restrict__ lengths, int64_t batch_size,
                                     int64_t max_len, int64_t ws_ints, int32_t* workspace,
                                     const int32_t* __restrict__ num_spans, int64_t mask_token,
                                     bool document_level, Params params, int64_t width,
                                     int64_t* tokens, int64_t* targets, int64_t* loss_mask,
                                     int64_t* positions, int32_t* sep) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= batch_size) return;
  RowWorkspace ws(workspace + row * ws_ints, max_len);
  const int64_t o = row * width;
  sep[row] = assemble_row(rows + row * max_len, lengths[row], ws.start, ws.end, ws.order,
                          num_spans[row], mask_token, document_level, params,
                          static_cast<int32_t>(width), tokens + o, targets + o, loss_mask + o,
                          positions + 2 * o, positions + 2 * o + width, ws.lengths);
}

unsigned int blocks_for(int64_t rows) {
  return static_cast<unsigned int>((rows + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

void sample_rows_cuda(SpanShuffleBatch& batch) {
  const int64_t batch_size = batch.tokens.size(0);
  sample_rows_kernel<<<blocks_for(batch_size), kThreadsPerBlock, 0,
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
  assemble_rows_kernel<<<blocks_for(batch_size), kThreadsPerBlock, 0,
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
    int64_t cls_id, int64_t eos_id, int64_t pad_id, int64_t mask_id, int64_t smask_id,
    int64_t gmask_id, int64_t sop_id, int64_t eop_id, int64_t vocab_size, int64_t output_length) {
  const c10::cuda::CUDAGuard device_guard(tokens.device());
  return run_span_shuffle_batch({&sample_rows_cuda, &assemble_rows_cuda}, tokens, lengths,
                                sentence_end_ids, seed, objective_probs, mask_ratio, poisson_lambda,
                                max_span_length, min_document_ratio, cls_id, eos_id, pad_id, mask_id,
                                smask_id, gmask_id, sop_id, eop_id, vocab_size, output_length);
}

}  // namespace

TORCH_LIBRARY_IMPL(glm_ext, CUDA, m) { m.impl("span_shuffle_batch", &span_shuffle_batch_cuda); }

}  // namespace glm_ext
