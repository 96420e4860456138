// CUDA kernels of embedding_2d (GLM's word + position + block-position input embedding) and its
// deterministic backward. The math is glm_ext/reference.py's embedding_2d; validation is shared
// with the CPU kernel (position_ops.h).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "common/cuda/launch_utils.cuh"
#include "position/position_ops.h"

namespace glm_ext {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
using cuda::ceil_div;
using cuda::is_aligned;
using cuda::kThreadsPerBlock;
using cuda::max_grid_blocks;
using cuda::Vec;

// ---------------------------------------------------------------------------------------------
// Forward: out[t] = word[ids[t]] + position[pos[t]] + block_position[bpos[t]].

// threadIdx.x walks the hidden dimension in VEC-element vectors, threadIdx.y picks one of the
// block's token rows; blocks stride over tokens. The three rows are summed in acc_t and rounded
// once.
template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    embedding_2d_kernel(const index_t* __restrict__ input_ids,
                        const index_t* __restrict__ position_ids,
                        const index_t* __restrict__ block_position_ids,
                        const scalar_t* __restrict__ word_weight,
                        const scalar_t* __restrict__ position_weight,
                        const scalar_t* __restrict__ block_position_weight, int64_t num_words,
                        int64_t num_positions, int64_t num_block_positions,
                        scalar_t* __restrict__ out, int64_t num_tokens, int64_t hidden_vecs) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  using vec_t = Vec<scalar_t, VEC>;
  const auto* word = reinterpret_cast<const vec_t*>(word_weight);
  const auto* position = reinterpret_cast<const vec_t*>(position_weight);
  const auto* block_position = reinterpret_cast<const vec_t*>(block_position_weight);
  auto* out_vec = reinterpret_cast<vec_t*>(out);

  for (int64_t t = int64_t{blockIdx.x} * blockDim.y + threadIdx.y; t < num_tokens;
       t += int64_t{gridDim.x} * blockDim.y) {
    const int64_t w = input_ids[t];
    const int64_t p = position_ids[t];
    const int64_t q = block_position_ids[t];
    vec_t* out_row = out_vec + t * hidden_vecs;
    // Ids are range-checked in Python only when the caller asks for it; an unchecked bad id must
    // still never read outside its table, so its row is poisoned with NaN instead.
    if (w < 0 || w >= num_words || p < 0 || p >= num_positions || q < 0 ||
        q >= num_block_positions) {
      vec_t nan_vec;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        nan_vec.val[k] = static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN());
      }
      for (int64_t v = threadIdx.x; v < hidden_vecs; v += blockDim.x) out_row[v] = nan_vec;
      continue;
    }
    const vec_t* word_row = word + w * hidden_vecs;
    const vec_t* position_row = position + p * hidden_vecs;
    const vec_t* block_position_row = block_position + q * hidden_vecs;
    for (int64_t v = threadIdx.x; v < hidden_vecs; v += blockDim.x) {
      const vec_t a = word_row[v];
      const vec_t b = position_row[v];
      const vec_t c = block_position_row[v];
      vec_t sum;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        sum.val[k] = static_cast<scalar_t>(static_cast<acc_t>(a.val[k]) +
                                           static_cast<acc_t>(b.val[k]) +
                                           static_cast<acc_t>(c.val[k]));
      }
      out_row[v] = sum;
    }
  }
}

template <typename scalar_t, typename index_t, int VEC>
void launch_embedding_2d(const Embedding2dIds& ids, const at::Tensor& word_weight,
                         const at::Tensor& position_weight,
                         const at::Tensor& block_position_weight, at::Tensor& out) {
  const int64_t num_tokens = ids.input_ids.numel();
  const int64_t hidden_vecs = word_weight.size(1) / VEC;
  // A warp-multiple of threads spans the row (looping if it is longer than a block); the rest of
  // the block takes further token rows.
  const int threads_x =
      static_cast<int>(std::min<int64_t>(ceil_div(hidden_vecs, kWarpSize) * kWarpSize,
                                         kThreadsPerBlock));
  const dim3 block(threads_x, kThreadsPerBlock / threads_x);
  const dim3 grid(
      static_cast<unsigned>(std::min(ceil_div(num_tokens, block.y), max_grid_blocks())));
  embedding_2d_kernel<scalar_t, index_t, VEC>
      <<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
          ids.input_ids.const_data_ptr<index_t>(), ids.position_ids.const_data_ptr<index_t>(),
          ids.block_position_ids.const_data_ptr<index_t>(),
          word_weight.const_data_ptr<scalar_t>(), position_weight.const_data_ptr<scalar_t>(),
          block_position_weight.const_data_ptr<scalar_t>(), word_weight.size(0),
          position_weight.size(0), block_position_weight.size(0), out.mutable_data_ptr<scalar_t>(),
          num_tokens, hidden_vecs);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// Backward: grad_table[r] = sum of grad_output[t] over the tokens t whose id in that table is r.
//
// Design (deterministic and free of host synchronisation):
// - Each token contributes three entries, one per table, keyed table_offset + id (offsets 0,
//   num_words, num_words + num_positions; out-of-range ids get kSkipKey, which sorts last and is
//   never summed). One stable sort of the 3N keys groups every table row's entries into one run,
//   in token order.
// - A run is summed by a segmented reduction over fixed chunks of kChunk = 32 sorted entries, one
//   warp per chunk and 32-vector column tile, walking its entries in order. A run that starts and
//   ends inside the chunk is written straight to its table row. Otherwise the chunk emits partial
//   sums: its "head" (the part of a run that began in an earlier chunk) and its "tail" (a run that
//   begins here and goes on past the chunk); a chunk inside a single run emits only its head.
// - The partials, two per chunk keyed by the chunk's first and last key, are again a sorted
//   sequence of keyed rows, so the same kernel reduces them, level after level, until one chunk
//   holds everything (levels ~ log16(3N / 32)). Missing partials keep their key (the sequence
//   stays sorted) with a "present" flag cleared; runs with no present entry write nothing.
// This replaces a second pass that, per split run, reduces its chunk heads in one CTA: in GLM the
// block-position-0 run holds ~75% of the tokens (thousands of chunks), so a per-run pass either
// serialises that run on a few SMs or launches a CTA per chunk and column tile that mostly exits
// at once. Here every level is spread over all chunks and column tiles, needs no atomics, and
// sums every row in an order fixed by the sorted keys alone.

constexpr int64_t kChunk = kWarpSize;  // one sorted entry per lane
constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
constexpr int kBatch = 8;  // rows loaded ahead of accumulating them, for memory-level parallelism
constexpr int64_t kSkipKey = std::numeric_limits<int64_t>::max();  // out-of-range id or padding
constexpr int64_t kNoKey = -1;  // the missing neighbour of the first and last chunk

template <typename index_t>
__device__ __forceinline__ int64_t table_key(index_t id, int64_t first_key, int64_t rows) {
  return (id >= 0 && id < rows) ? first_key + id : kSkipKey;
}

template <typename index_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
    build_keys_kernel(const index_t* __restrict__ input_ids,
                      const index_t* __restrict__ position_ids,
                      const index_t* __restrict__ block_position_ids, int64_t num_tokens,
                      int64_t num_words, int64_t num_positions, int64_t num_block_positions,
                      int64_t* __restrict__ keys) {
  for (int64_t t = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; t < num_tokens;
       t += int64_t{gridDim.x} * blockDim.x) {
    keys[t] = table_key(input_ids[t], 0, num_words);
    keys[num_tokens + t] = table_key(position_ids[t], num_words, num_positions);
    keys[2 * num_tokens + t] =
        table_key(block_position_ids[t], num_words + num_positions, num_block_positions);
  }
}

// One level's input: entries sorted by key, each naming a row of `rows` ([*, hidden]).
template <typename in_t>
struct SortedEntries {
  const int64_t* keys;    // [num_entries], nondecreasing
  const uint8_t* present; // [num_entries]; nullptr on level 0, where present == key != kSkipKey
  const int64_t* order;   // level 0: entry e is token order[e] % num_tokens; nullptr: row e
  const in_t* rows;
  int64_t num_entries;
  int64_t num_tokens;
};

// The next level's input: entries 2c (head) and 2c + 1 (tail) of every chunk c.
template <typename acc_t>
struct ChunkPartials {
  int64_t* keys;
  uint8_t* present;
  acc_t* rows;
};

// The three outputs (word, position, block position), addressed by key: the word table holds
// keys [0, first_key[0]), the position table [first_key[0], first_key[1]), the block-position
// table the rest.
template <typename scalar_t>
struct TableGrads {
  scalar_t* table[3];
  int64_t first_key[2];
};

template <typename in_t, typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    sum_runs_kernel(SortedEntries<in_t> in,
                    ChunkPartials<at::acc_type<scalar_t, /*is_cuda=*/true>> next,
                    TableGrads<scalar_t> grads, int64_t num_chunks, int64_t hidden_vecs) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  using in_vec = Vec<in_t, VEC>;
  using acc_vec = Vec<acc_t, VEC>;
  using out_vec = Vec<scalar_t, VEC>;

  const int64_t chunk = int64_t{blockIdx.x} * kWarpsPerBlock + threadIdx.y;
  if (chunk >= num_chunks) return;  // whole warps only: no block-wide synchronisation below
  const int lane = threadIdx.x;
  const int64_t begin = chunk * kChunk;

  // Lane i holds entry begin + i; lanes past the end hold padding that is never summed.
  const int64_t entry = begin + lane;
  const bool in_range = entry < in.num_entries;
  const int64_t my_key = in_range ? in.keys[entry] : kSkipKey;
  const bool my_present =
      in_range && (in.present != nullptr ? in.present[entry] != 0 : my_key != kSkipKey);
  int64_t my_row = entry;
  if (my_present && in.order != nullptr) my_row = in.order[entry] % in.num_tokens;
  const unsigned present_mask = __ballot_sync(kFullMask, my_present);
  const int64_t first_key = __shfl_sync(kFullMask, my_key, 0);
  const int64_t last_key = __shfl_sync(kFullMask, my_key, kChunk - 1);
  // The chunk opens inside a run iff the previous entry has its first key, and its last run goes
  // on iff the next entry has its last key.
  const int64_t prev_key = begin > 0 ? in.keys[begin - 1] : kNoKey;
  const int64_t next_key = begin + kChunk < in.num_entries ? in.keys[begin + kChunk] : kNoKey;

  const auto* rows = reinterpret_cast<const in_vec*>(in.rows);
  auto* partials = reinterpret_cast<acc_vec*>(next.rows);
  for (int64_t tile = blockIdx.y; tile * kWarpSize < hidden_vecs; tile += gridDim.y) {
    const int64_t v = tile * kWarpSize + lane;
    const bool active = v < hidden_vecs;  // lanes past the row still take part in the shuffles
    acc_vec acc{};
    int64_t run_key = first_key;
    bool run_present = false;  // the run has an entry to sum (else it writes nothing)
    bool run_is_head = prev_key == first_key;
    bool head_present = false;
    bool tail_present = false;

    auto end_run = [&](bool continues_past_chunk) {
      int64_t slot = -1;  // partial entry of the next level, or -1 for a finished row
      if (run_is_head) {
        head_present = run_present;
        slot = 2 * chunk;
      } else if (continues_past_chunk) {
        tail_present = run_present;
        slot = 2 * chunk + 1;
      }
      if (!run_present || !active) return;
      if (slot >= 0) {
        partials[slot * hidden_vecs + v] = acc;
        return;
      }
      // Branches rather than indexing the parameter arrays, which would spill them to local memory.
      scalar_t* table = grads.table[0];
      int64_t row = run_key;
      if (run_key >= grads.first_key[1]) {
        table = grads.table[2];
        row -= grads.first_key[1];
      } else if (run_key >= grads.first_key[0]) {
        table = grads.table[1];
        row -= grads.first_key[0];
      }
      out_vec out;
#pragma unroll
      for (int k = 0; k < VEC; ++k) out.val[k] = static_cast<scalar_t>(acc.val[k]);
      reinterpret_cast<out_vec*>(table)[row * hidden_vecs + v] = out;
    };

    for (int i0 = 0; i0 < kChunk; i0 += kBatch) {
      in_vec vals[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t row = __shfl_sync(kFullMask, my_row, i0 + u);
        if (active && ((present_mask >> (i0 + u)) & 1u)) vals[u] = rows[row * hidden_vecs + v];
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t key = __shfl_sync(kFullMask, my_key, i0 + u);
        if (key != run_key) {
          end_run(/*continues_past_chunk=*/false);
          acc = acc_vec{};
          run_key = key;
          run_present = false;
          run_is_head = false;
        }
        if ((present_mask >> (i0 + u)) & 1u) {
          run_present = true;
#pragma unroll
          for (int k = 0; k < VEC; ++k) acc.val[k] += static_cast<acc_t>(vals[u].val[k]);
        }
      }
    }
    end_run(/*continues_past_chunk=*/next_key == run_key);

    // Keys and flags of this chunk's partials do not depend on the column: tile 0 writes them.
    if (tile == 0 && lane == 0) {
      next.keys[2 * chunk] = first_key;
      next.keys[2 * chunk + 1] = last_key;
      next.present[2 * chunk] = head_present;
      next.present[2 * chunk + 1] = tail_present;
    }
  }
}

// Sums the runs of `sorted_keys` (token order[e] % N for entry e) into `grads`, level by level.
template <typename scalar_t, int VEC>
void sum_runs(const at::Tensor& grad, const at::Tensor& sorted_keys, const at::Tensor& order,
              const TableGrads<scalar_t>& grads) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  const int64_t hidden = grad.size(-1);
  const int64_t hidden_vecs = hidden / VEC;
  const dim3 block(kWarpSize, kWarpsPerBlock);
  // gridDim.y is capped at 65535; the blocks then stride over the remaining column tiles.
  const auto grid_y =
      static_cast<unsigned>(std::min<int64_t>(ceil_div(hidden_vecs, kWarpSize), 65535));
  const auto stream = at::cuda::getCurrentCUDAStream();

  at::Tensor keys = sorted_keys;
  at::Tensor present;  // levels >= 1
  at::Tensor rows;     // levels >= 1: partial sums in acc_t
  int64_t num_entries = sorted_keys.numel();
  for (bool first_level = true;; first_level = false) {
    const int64_t num_chunks = ceil_div(num_entries, kChunk);
    at::Tensor next_keys = at::empty({2 * num_chunks}, keys.options());
    at::Tensor next_present = at::empty({2 * num_chunks}, keys.options().dtype(at::kByte));
    at::Tensor next_rows = at::empty(
        {2 * num_chunks, hidden}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const ChunkPartials<acc_t> next{next_keys.mutable_data_ptr<int64_t>(),
                                    next_present.mutable_data_ptr<uint8_t>(),
                                    next_rows.mutable_data_ptr<acc_t>()};
    const dim3 grid(static_cast<unsigned>(ceil_div(num_chunks, kWarpsPerBlock)), grid_y);
    if (first_level) {
      const SortedEntries<scalar_t> in{keys.const_data_ptr<int64_t>(), nullptr,
                                       order.const_data_ptr<int64_t>(),
                                       grad.const_data_ptr<scalar_t>(), num_entries,
                                       grad.numel() / hidden};
      sum_runs_kernel<scalar_t, scalar_t, VEC>
          <<<grid, block, 0, stream>>>(in, next, grads, num_chunks, hidden_vecs);
    } else {
      const SortedEntries<acc_t> in{keys.const_data_ptr<int64_t>(),
                                    present.const_data_ptr<uint8_t>(), nullptr,
                                    rows.const_data_ptr<acc_t>(), num_entries, 0};
      sum_runs_kernel<acc_t, scalar_t, VEC>
          <<<grid, block, 0, stream>>>(in, next, grads, num_chunks, hidden_vecs);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (num_chunks == 1) break;  // one chunk has no neighbours: every run was finished
    keys = next_keys;
    present = next_present;
    rows = next_rows;
    num_entries = 2 * num_chunks;
  }
}

}  // namespace

at::Tensor embedding_2d_cuda(const at::Tensor& input_ids, const at::Tensor& position_ids,
                             const at::Tensor& block_position_ids, const at::Tensor& word_weight,
                             const at::Tensor& position_weight,
                             const at::Tensor& block_position_weight) {
  const Embedding2dIds ids = check_embedding_2d_inputs(
      input_ids, position_ids, block_position_ids, word_weight, position_weight,
      block_position_weight);
  c10::cuda::CUDAGuard device_guard(input_ids.device());
  const at::Tensor word = word_weight.contiguous();
  const at::Tensor position = position_weight.contiguous();
  const at::Tensor block_position = block_position_weight.contiguous();
  const int64_t hidden = word.size(1);
  std::vector<int64_t> out_shape = input_ids.sizes().vec();
  out_shape.push_back(hidden);
  at::Tensor out = at::empty(out_shape, word.options());
  if (out.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, word.scalar_type(), "embedding_2d_cuda", [&] {
        AT_DISPATCH_INDEX_TYPES(ids.input_ids.scalar_type(), "embedding_2d_cuda", [&] {
          constexpr int kVec = 16 / sizeof(scalar_t);
          const bool vectorized = hidden % kVec == 0 && is_aligned(word.const_data_ptr(), 16) &&
                                  is_aligned(position.const_data_ptr(), 16) &&
                                  is_aligned(block_position.const_data_ptr(), 16) &&
                                  is_aligned(out.const_data_ptr(), 16);
          if (vectorized) {
            launch_embedding_2d<scalar_t, index_t, kVec>(ids, word, position, block_position, out);
          } else {
            launch_embedding_2d<scalar_t, index_t, 1>(ids, word, position, block_position, out);
          }
        });
      });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input_ids, const at::Tensor& position_ids,
    const at::Tensor& block_position_ids, int64_t num_words, int64_t num_positions,
    int64_t num_block_positions) {
  const Embedding2dIds ids = check_embedding_2d_backward_inputs(
      grad_output, input_ids, position_ids, block_position_ids, num_words, num_positions,
      num_block_positions);
  c10::cuda::CUDAGuard device_guard(input_ids.device());
  const at::Tensor grad = grad_output.contiguous();
  const int64_t hidden = grad.size(-1);
  // Rows that no token touches stay zero.
  at::Tensor grad_word = at::zeros({num_words, hidden}, grad.options());
  at::Tensor grad_position = at::zeros({num_positions, hidden}, grad.options());
  at::Tensor grad_block_position = at::zeros({num_block_positions, hidden}, grad.options());
  const int64_t num_tokens = ids.input_ids.numel();
  if (num_tokens == 0 || hidden == 0) return {grad_word, grad_position, grad_block_position};

  at::Tensor keys = at::empty({3 * num_tokens}, ids.input_ids.options().dtype(at::kLong));
  AT_DISPATCH_INDEX_TYPES(ids.input_ids.scalar_type(), "embedding_2d_backward_cuda", [&] {
    const auto grid = static_cast<unsigned>(
        std::min(ceil_div(num_tokens, kThreadsPerBlock), max_grid_blocks()));
    build_keys_kernel<index_t><<<grid, kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
        ids.input_ids.const_data_ptr<index_t>(), ids.position_ids.const_data_ptr<index_t>(),
        ids.block_position_ids.const_data_ptr<index_t>(), num_tokens, num_words, num_positions,
        num_block_positions, keys.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // Stable: equal keys keep token order, so each run is summed in the same order every time.
  at::Tensor sorted_keys;
  at::Tensor order;
  std::tie(sorted_keys, order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, grad.scalar_type(), "embedding_2d_backward_cuda", [&] {
        const TableGrads<scalar_t> grads{
            {grad_word.mutable_data_ptr<scalar_t>(), grad_position.mutable_data_ptr<scalar_t>(),
             grad_block_position.mutable_data_ptr<scalar_t>()},
            {num_words, num_words + num_positions}};
        constexpr int kVec = 16 / sizeof(scalar_t);
        const bool vectorized = hidden % kVec == 0 && is_aligned(grad.const_data_ptr(), 16) &&
                                is_aligned(grads.table[0], 16) &&
                                is_aligned(grads.table[1], 16) && is_aligned(grads.table[2], 16);
        if (vectorized) {
          sum_runs<scalar_t, kVec>(grad, sorted_keys, order, grads);
        } else {
          sum_runs<scalar_t, 1>(grad, sorted_keys, order, grads);
        }
      });
  return {grad_word, grad_position, grad_block_position};
}

}  // namespace glm_ext

TORCH_LIBRARY_IMPL(glm_ext, CUDA, m) {
  m.impl("embedding_2d", &glm_ext::embedding_2d_cuda);
  m.impl("embedding_2d_backward", &glm_ext::embedding_2d_backward_cuda);
}
