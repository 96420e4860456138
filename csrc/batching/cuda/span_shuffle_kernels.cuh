// The CUDA kernels of span_shuffle_batch: one thread per row, each running the per-row algorithm
// of batching/span_shuffle.h (shared with the CPU kernel, so the same seed gives the same batch on
// both devices). No CUDA runtime call here: span_shuffle.cu launches them on a GPU, and the tests
// run the same code on the CPU (python_tests/flash_emulator).
#pragma once

#include <cstdint>

#include "batching/span_shuffle.h"

namespace glm_ext::cuda::span_shuffle_kernels {

using namespace glm_ext::span_shuffle;

// One thread per row (a row is sequential work), blocks of kRowsPerBlock rows.
constexpr int kRowsPerBlock = 64;

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

}  // namespace glm_ext::cuda::span_shuffle_kernels
