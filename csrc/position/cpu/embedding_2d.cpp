// CPU kernels of embedding_2d: fused gather-and-sum of GLM's three embedding tables, and its
// deterministic backward.
//
// Both are memory-bound: the forward gathers three table rows per token (the word row usually
// from memory, not cache), the backward writes three dense gradient tables, mostly zeros. The
// forward sums the rows with the widest vectors the CPU has (per-ISA loops, cpu_isa()) and leaves
// fetching them to the hardware prefetcher: prefetching the rows of the tokens a few places ahead
// made it slower (b4 s512 h2048, 2 threads: 2.45 against 2.10-2.13 ms). The backward writes every
// row of a gradient table once (zeros, or the sum of its tokens' rows), where zeroing the table
// first writes the used rows twice. Except for large tables: they are new memory (glibc maps every
// allocation of 32 MB or more afresh), whose zeroing takes a page fault per 4 KB, and the faults
// cost less under ATen's fill of the whole table than under memset of the runs between used rows
// (50304 x 1024 floats, one thread: 79 against 90 ms); such a table is zeroed by ATen first, and
// only its used rows are written here. Its time is then the kernel's: asking for transparent huge
// pages halves the median (b4 s512 h2048, 2 threads: 40 against 80 ms), but on the development VM
// about one call in ten then takes 0.5 s (tried twice, dropped twice); prefaulting with
// MADV_POPULATE_WRITE gains nothing.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstring>
#include <vector>

#include "common/cpu_isa.h"
#include "common/parallel.h"
#include "position/position_ops.h"

namespace glm_ext {
namespace {

template <typename index_t>
void check_index_range(const at::Tensor& ids, int64_t rows, const char* name,
                       const char* table_name) {
  const index_t* data = ids.const_data_ptr<index_t>();
  for (int64_t i = 0, n = ids.numel(); i < n; ++i) {
    TORCH_CHECK_INDEX(data[i] >= 0 && data[i] < rows, name, " must lie in [0, ", rows, ") (",
                      table_name, " has ", rows, " rows), got ", static_cast<int64_t>(data[i]),
                      " at flat index ", i);
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: out[t] = word[ids[t]] + position[pos[t]] + block_position[bpos[t]], summed in the
// accumulation type and rounded once.

template <typename scalar_t, typename index_t>
struct GatherArgs {
  const index_t *word_ids, *position_ids, *block_ids;
  const scalar_t *word, *position, *block;
  scalar_t* out;
  int64_t hidden;
};

template <typename scalar_t, typename index_t>
GLM_EXT_ALWAYS_INLINE void gather_sum_impl(const GatherArgs<scalar_t, index_t>& g, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t hidden = g.hidden;
  for (int64_t t = begin; t < end; ++t) {
    const scalar_t* __restrict__ a = g.word + static_cast<int64_t>(g.word_ids[t]) * hidden;
    const scalar_t* __restrict__ b = g.position + static_cast<int64_t>(g.position_ids[t]) * hidden;
    const scalar_t* __restrict__ c = g.block + static_cast<int64_t>(g.block_ids[t]) * hidden;
    scalar_t* __restrict__ o = g.out + t * hidden;
    for (int64_t h = 0; h < hidden; ++h) {
      o[h] = static_cast<scalar_t>(static_cast<acc_t>(a[h]) + static_cast<acc_t>(b[h]) + static_cast<acc_t>(c[h]));
    }
  }
}

template <typename scalar_t, typename index_t>
void gather_sum_baseline(const GatherArgs<scalar_t, index_t>& g, int64_t begin, int64_t end) {
  gather_sum_impl(g, begin, end);
}
#if GLM_EXT_X86_KERNELS
template <typename scalar_t, typename index_t>
GLM_EXT_AVX2 void gather_sum_avx2(const GatherArgs<scalar_t, index_t>& g, int64_t begin, int64_t end) {
  gather_sum_impl(g, begin, end);
}
template <typename scalar_t, typename index_t>
GLM_EXT_AVX512 void gather_sum_avx512(const GatherArgs<scalar_t, index_t>& g, int64_t begin, int64_t end) {
  gather_sum_impl(g, begin, end);
}
#endif

template <typename scalar_t, typename index_t>
void gather_sum(const GatherArgs<scalar_t, index_t>& g, int64_t begin, int64_t end) {
#if GLM_EXT_X86_KERNELS
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return gather_sum_avx512(g, begin, end);
    case CpuIsa::kAvx2: return gather_sum_avx2(g, begin, end);
    case CpuIsa::kBaseline: break;
  }
#endif
  gather_sum_baseline(g, begin, end);
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
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word.scalar_type(), "embedding_2d_cpu", [&] {
      const GatherArgs<scalar_t, index_t> g{
          ids.input_ids.const_data_ptr<index_t>(), ids.position_ids.const_data_ptr<index_t>(),
          ids.block_position_ids.const_data_ptr<index_t>(), word.const_data_ptr<scalar_t>(),
          pos.const_data_ptr<scalar_t>(), block.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          hidden};
      const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(hidden, 1));
      at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) { gather_sum(g, begin, end); });
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------
// Backward: grad_table[r] = sum of grad_output rows of the tokens whose id is r, in token order.

template <typename scalar_t>
GLM_EXT_ALWAYS_INLINE void add_rows_impl(const scalar_t* grad, const int64_t* tokens, int64_t count,
                                         int64_t hidden, int64_t col0, int64_t width,
                                         at::opmath_type<scalar_t>* __restrict__ acc, scalar_t* __restrict__ dst) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t c = 0; c < width; ++c) acc[c] = acc_t(0);
  for (int64_t k = 0; k < count; ++k) {
    const scalar_t* __restrict__ g = grad + tokens[k] * hidden + col0;
    for (int64_t c = 0; c < width; ++c) acc[c] += static_cast<acc_t>(g[c]);
  }
  for (int64_t c = 0; c < width; ++c) dst[c] = static_cast<scalar_t>(acc[c]);
}

template <typename scalar_t>
void add_rows_baseline(const scalar_t* grad, const int64_t* tokens, int64_t count, int64_t hidden, int64_t col0,
                       int64_t width, at::opmath_type<scalar_t>* acc, scalar_t* dst) {
  add_rows_impl(grad, tokens, count, hidden, col0, width, acc, dst);
}
#if GLM_EXT_X86_KERNELS
template <typename scalar_t>
GLM_EXT_AVX2 void add_rows_avx2(const scalar_t* grad, const int64_t* tokens, int64_t count, int64_t hidden,
                                int64_t col0, int64_t width, at::opmath_type<scalar_t>* acc, scalar_t* dst) {
  add_rows_impl(grad, tokens, count, hidden, col0, width, acc, dst);
}
template <typename scalar_t>
GLM_EXT_AVX512 void add_rows_avx512(const scalar_t* grad, const int64_t* tokens, int64_t count, int64_t hidden,
                                    int64_t col0, int64_t width, at::opmath_type<scalar_t>* acc, scalar_t* dst) {
  add_rows_impl(grad, tokens, count, hidden, col0, width, acc, dst);
}
#endif

// dst[c] = sum over k of grad[tokens[k] * hidden + col0 + c] for c < width, in the order of tokens.
template <typename scalar_t>
void add_rows(const scalar_t* grad, const int64_t* tokens, int64_t count, int64_t hidden, int64_t col0,
              int64_t width, at::opmath_type<scalar_t>* acc, scalar_t* dst) {
#if GLM_EXT_X86_KERNELS
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return add_rows_avx512(grad, tokens, count, hidden, col0, width, acc, dst);
    case CpuIsa::kAvx2: return add_rows_avx2(grad, tokens, count, hidden, col0, width, acc, dst);
    case CpuIsa::kBaseline: break;
  }
#endif
  add_rows_baseline(grad, tokens, count, hidden, col0, width, acc, dst);
}

// The tokens of one table grouped by row, in token order (a stable counting sort): the tokens of
// row r are order[row_start[r], row_start[r + 1]).
struct RowGroups {
  std::vector<int64_t> row_start, order;
  int64_t count(int64_t row) const { return row_start[row + 1] - row_start[row]; }
};

template <typename index_t>
RowGroups group_by_row(const index_t* ids, int64_t tokens, int64_t rows) {
  RowGroups g{std::vector<int64_t>(rows + 1, 0), std::vector<int64_t>(tokens)};
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t id = ids[t];
    TORCH_CHECK_INDEX(id >= 0 && id < rows, "embedding_2d_backward: id ", id,
                      " is outside a table of ", rows, " rows");
    ++g.row_start[id + 1];
  }
  for (int64_t r = 0; r < rows; ++r) g.row_start[r + 1] += g.row_start[r];
  std::vector<int64_t> next(g.row_start.begin(), g.row_start.end() - 1);
  for (int64_t t = 0; t < tokens; ++t) g.order[next[ids[t]]++] = t;
  return g;
}

// One piece of the backward: the unused rows [row, row_end) of a table zeroed, or the columns
// [col0, col0 + width) of its used row `row` summed (row_end = row + 1).
struct GradPiece {
  int table;
  bool used;
  int64_t row, row_end, col0, width;
};

constexpr int64_t kColumnBlock = 256;      // columns of a used row summed as one piece
constexpr int64_t kZeroBytes = 64 << 10;   // bytes of unused rows zeroed as one piece
constexpr int64_t kNewMemoryBytes = int64_t{32} << 20;  // glibc's largest mmap threshold

// Fills the gradient tables [rows[i], hidden] (uninitialised; or zeroed where `zeroed[i]`, then
// only their used rows) in one parallel pass over pieces of about the same size, taken by the
// threads as they become free (a descheduled thread does not hold the others up, and the tables do
// not wait for one another). A row shared by most tokens
// (block position 0 covers all of Part A) is split into column blocks; every element is summed by
// one piece in token order whatever the thread count: deterministic.
template <typename scalar_t, typename index_t>
void tables_grad(const scalar_t* grad, const std::array<const index_t*, 3>& ids, int64_t tokens, int64_t hidden,
                 const std::array<int64_t, 3>& rows, const std::array<scalar_t*, 3>& tables,
                 const std::array<bool, 3>& zeroed) {
  using acc_t = at::opmath_type<scalar_t>;
  std::array<RowGroups, 3> groups;
  for (int i = 0; i < 3; ++i) groups[i] = group_by_row(ids[i], tokens, rows[i]);
  const int64_t row_bytes = hidden * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t zero_rows = std::max<int64_t>(1, kZeroBytes / std::max<int64_t>(row_bytes, 1));
  std::vector<GradPiece> pieces;
  std::vector<int64_t> costs;  // bytes read and written
  for (int i = 0; i < 3; ++i) {
    for (int64_t r = 0; r < rows[i];) {
      if (groups[i].count(r) > 0) {
        for (int64_t col0 = 0; col0 < hidden; col0 += kColumnBlock) {
          const int64_t width = std::min(kColumnBlock, hidden - col0);
          pieces.push_back({i, true, r, r + 1, col0, width});
          costs.push_back((groups[i].count(r) + 1) * width * static_cast<int64_t>(sizeof(scalar_t)));
        }
        ++r;
      } else {
        int64_t end = r + 1;
        while (end < rows[i] && end - r < zero_rows && groups[i].count(end) == 0) ++end;
        if (!zeroed[i]) {
          pieces.push_back({i, false, r, end, 0, hidden});
          costs.push_back((end - r) * row_bytes);
        }
        r = end;
      }
    }
  }
  parallel_over_items(costs, [&](int64_t begin, int64_t end) {
    acc_t acc[kColumnBlock];
    for (int64_t index = begin; index < end; ++index) {
      const GradPiece& p = pieces[index];
      scalar_t* dst = tables[p.table] + p.row * hidden;
      if (!p.used) {
        std::memset(dst, 0, (p.row_end - p.row) * row_bytes);
      } else {
        const RowGroups& g = groups[p.table];
        add_rows(grad, g.order.data() + g.row_start[p.row], g.count(p.row), hidden, p.col0, p.width, acc,
                 dst + p.col0);
      }
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
  const std::array<int64_t, 3> rows{num_words, num_positions, num_block_positions};
  std::array<at::Tensor, 3> tables;
  std::array<bool, 3> zeroed;  // large tables: zeroed by ATen first (see the top of the file)
  for (int i = 0; i < 3; ++i) {
    zeroed[i] = rows[i] * hidden * grad.element_size() >= kNewMemoryBytes;
    tables[i] = zeroed[i] ? at::zeros({rows[i], hidden}, grad.options()) : at::empty({rows[i], hidden}, grad.options());
  }

  AT_DISPATCH_INDEX_TYPES(ids.input_ids.scalar_type(), "embedding_2d_backward_cpu", [&] {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "embedding_2d_backward_cpu", [&] {
      tables_grad<scalar_t, index_t>(
          grad.const_data_ptr<scalar_t>(),
          {ids.input_ids.const_data_ptr<index_t>(), ids.position_ids.const_data_ptr<index_t>(),
           ids.block_position_ids.const_data_ptr<index_t>()},
          tokens, hidden, rows,
          {tables[0].mutable_data_ptr<scalar_t>(), tables[1].mutable_data_ptr<scalar_t>(),
           tables[2].mutable_data_ptr<scalar_t>()},
          zeroed);
    });
  });
  return {tables[0], tables[1], tables[2]};
}

}  // namespace

TORCH_LIBRARY_IMPL(glm_ext, CPU, m) {
  m.impl("embedding_2d", &embedding_2d_cpu);
  m.impl("embedding_2d_backward", &embedding_2d_backward_cpu);
}

}  // namespace glm_ext
