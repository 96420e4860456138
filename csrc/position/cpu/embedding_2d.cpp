// CPU kernels of embedding_2d: fused gather-and-sum of GLM's three embedding tables, and its
// deterministic backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "position/position_ops.h"

namespace glm_ext {
namespace {

template <typename index_t>
void check_index_range(const at::Tensor& ids, int64_t rows, const char* name,
                       const char* table_name) {
  const index_t* data = ids.data_ptr<index_t>();
  for (int64_t i = 0, n = ids.numel(); i < n; ++i) {
    TORCH_CHECK_INDEX(data[i] >= 0 && data[i] < rows, name, " must lie in [0, ", rows, ") (",
                      table_name, " has ", rows, " rows), got ", static_cast<int64_t>(data[i]),
                      " at flat index ", i);
  }
}

// One output row; restrict tells the compiler the rows do not alias, so the loop vectorises.
template <typename scalar_t>
inline void sum_three_rows(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                           const scalar_t* __restrict__ c, scalar_t* __restrict__ out,
                           int64_t hidden) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t h = 0; h < hidden; ++h) {
    out[h] = static_cast<scalar_t>(static_cast<acc_t>(a[h]) + static_cast<acc_t>(b[h]) +
                                   static_cast<acc_t>(c[h]));
  }
}

at::Tensor embedding_2d_cpu(const at::Tensor& input_ids, const at::Tensor& position_ids,
                            const at::Tensor& block_position_ids, const at::Tensor& word_weight,
                            const at::Tensor& position_weight,
                            const at::Tensor& block_position_weight) {
  const auto ids = check_embedding_2d_inputs(input_ids, position_ids, block_position_ids,
                                             word_weight, position_weight, block_position_weight);
  const auto word = word_weight.contiguous();
  const auto pos = position_weight.contiguous();
  const auto block = block_position_weight.contiguous();
  const int64_t hidden = word.size(1);
  const int64_t tokens = ids.input_ids.numel();
  auto out_shape = input_ids.sizes().vec();
  out_shape.push_back(hidden);
  auto out = at::empty(out_shape, word.options());

  AT_DISPATCH_INDEX_TYPES(ids.input_ids.scalar_type(), "embedding_2d_cpu", [&] {
    check_index_range<index_t>(ids.input_ids, word.size(0), "input_ids", "word_weight");
    check_index_range<index_t>(ids.position_ids, pos.size(0), "position_ids", "position_weight");
    check_index_range<index_t>(ids.block_position_ids, block.size(0), "block_position_ids",
                               "block_position_weight");
    const index_t* word_ids = ids.input_ids.data_ptr<index_t>();
    const index_t* pos_ids = ids.position_ids.data_ptr<index_t>();
    const index_t* block_ids = ids.block_position_ids.data_ptr<index_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word.scalar_type(), "embedding_2d_cpu", [&] {
      const scalar_t* w = word.data_ptr<scalar_t>();
      const scalar_t* p = pos.data_ptr<scalar_t>();
      const scalar_t* b = block.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>();
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1));
      at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          sum_three_rows(w + static_cast<int64_t>(word_ids[t]) * hidden,
                         p + static_cast<int64_t>(pos_ids[t]) * hidden,
                         b + static_cast<int64_t>(block_ids[t]) * hidden, o + t * hidden, hidden);
        }
      });
    });
  });
  return out;
}

// grad_table[r] = sum of grad_output rows of the tokens whose id is r, in token order. A stable
// counting sort groups tokens by row; work items are (row, column block) pairs so that a row
// shared by most tokens (block position 0 covers all of Part A) is split across threads, and
// every element is summed in the same order whatever the thread count: deterministic.
template <typename scalar_t, typename index_t>
void accumulate_table_grad(const scalar_t* grad, const index_t* ids, int64_t tokens,
                           int64_t hidden, int64_t rows, scalar_t* table_grad) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<int64_t> row_start(rows + 1, 0);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t id = ids[t];
    TORCH_CHECK_INDEX(id >= 0 && id < rows, "embedding_2d_backward: id ", id,
                      " is outside a table of ", rows, " rows");
    ++row_start[id + 1];
  }
  std::vector<int64_t> used_rows;
  for (int64_t r = 0; r < rows; ++r) {
    if (row_start[r + 1] > 0) used_rows.push_back(r);
    row_start[r + 1] += row_start[r];
  }
  std::vector<int64_t> order(tokens);
  {
    std::vector<int64_t> next(row_start.begin(), row_start.end() - 1);
    for (int64_t t = 0; t < tokens; ++t) order[next[ids[t]]++] = t;
  }
  constexpr int64_t kColumnBlock = 256;
  const int64_t column_blocks = (hidden + kColumnBlock - 1) / kColumnBlock;
  const int64_t items = static_cast<int64_t>(used_rows.size()) * column_blocks;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    acc_t acc[kColumnBlock];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = used_rows[item / column_blocks];
      const int64_t col0 = (item % column_blocks) * kColumnBlock;
      const int64_t width = std::min(kColumnBlock, hidden - col0);
      std::fill(acc, acc + width, acc_t(0));
      for (int64_t k = row_start[row]; k < row_start[row + 1]; ++k) {
        const scalar_t* g = grad + order[k] * hidden + col0;
        for (int64_t c = 0; c < width; ++c) acc[c] += static_cast<acc_t>(g[c]);
      }
      scalar_t* dst = table_grad + row * hidden + col0;
      for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input_ids, const at::Tensor& position_ids,
    const at::Tensor& block_position_ids, int64_t num_words, int64_t num_positions,
    int64_t num_block_positions) {
  const auto ids = check_embedding_2d_backward_inputs(grad_output, input_ids, position_ids,
                                                      block_position_ids, num_words,
                                                      num_positions, num_block_positions);
  const auto grad = grad_output.contiguous();
  const int64_t hidden = grad.size(-1);
  const int64_t tokens = ids.input_ids.numel();
  auto grad_word = at::zeros({num_words, hidden}, grad.options());
  auto grad_pos = at::zeros({num_positions, hidden}, grad.options());
  auto grad_block = at::zeros({num_block_positions, hidden}, grad.options());

  AT_DISPATCH_INDEX_TYPES(ids.input_ids.scalar_type(), "embedding_2d_backward_cpu", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "embedding_2d_backward_cpu", [&] {
      const scalar_t* g = grad.data_ptr<scalar_t>();
      accumulate_table_grad(g, ids.input_ids.data_ptr<index_t>(), tokens, hidden, num_words,
                            grad_word.data_ptr<scalar_t>());
      accumulate_table_grad(g, ids.position_ids.data_ptr<index_t>(), tokens, hidden,
                            num_positions, grad_pos.data_ptr<scalar_t>());
      accumulate_table_grad(g, ids.block_position_ids.data_ptr<index_t>(), tokens, hidden,
                            num_block_positions, grad_block.data_ptr<scalar_t>());
    });
  });
  return {grad_word, grad_pos, grad_block};
}

}  // namespace

TORCH_LIBRARY_IMPL(glm_ext, CPU, m) {
  m.impl("embedding_2d", &embedding_2d_cpu);
  m.impl("embedding_2d_backward", &embedding_2d_backward_cpu);
}

}  // namespace glm_ext
