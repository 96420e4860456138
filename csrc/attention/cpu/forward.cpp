// CPU forward of mixed_mask_attention (GLM_SPEC section 2): tiled online-softmax attention
// (flash-attention 2) under GLM's mixed mask, memory linear in the sequence length.
//
// One work item per (sample, query head, block of kTile queries), in parallel. An item scales its
// queries by softmax_scale * log2(e) into a transposed tile, then walks the key tiles its queries
// see: scores S^T = K Q^T [keys, queries], the online softmax down the key rows (per-query
// statistics are vectors across a row), and out += P V; finally out /= sum and lse = max +
// log(sum). Keys and values are read from per-head copies, converted once for the consecutive
// items of a thread. While an item runs, the strided input rows its successor reads first (its
// queries, the keys and values not copied yet) and its output rows are prefetched into L2, a slice
// per key tile: from a cold cache they would otherwise arrive one row at a time. Scores,
// probabilities and the output accumulator are float32 (float64 for float64 inputs).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

#include "attention/cpu/attention_cpu.h"

namespace glm_ext::attention_cpu {
namespace {

struct QueryBlock {
  int64_t sample, head, q0;
};

template <typename scalar_t>
void forward_kernel(const MixedMaskAttentionArgs& a, const std::vector<MixedMaskSample>& samples,
                    at::Tensor& out, at::Tensor& lse) {
  using T = AccType<scalar_t>;
  const TileKernels<T>& kernels = tile_kernels<T>();
  const int64_t dim = a.head_dim, dp = padded_head_dim<T>(dim);
  const int64_t group = a.heads_q / a.heads_kv;
  const T scale2 = static_cast<T>(a.softmax_scale * M_LOG2E);
  const scalar_t* q = a.q.const_data_ptr<scalar_t>();
  const scalar_t* k = a.k.const_data_ptr<scalar_t>();
  const scalar_t* v = a.v.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  T* lse_out = lse.mutable_data_ptr<T>();
  const TokenStrides o_strides = token_strides(out), lse_strides = a.lse_strides();

  // Items sample-major, then head, then block: a thread's consecutive items share their keys.
  std::vector<QueryBlock> items;
  std::vector<int64_t> costs;
  int64_t max_len_k = 0;
  for (int64_t si = 0; si < static_cast<int64_t>(samples.size()); ++si) {
    const MixedMaskSample& s = samples[si];
    max_len_k = std::max(max_len_k, s.len_k);
    for (int64_t h = 0; h < a.heads_q; ++h) {
      for (int64_t q0 = 0; q0 < s.len_q; q0 += kTile) {
        items.push_back({si, h, q0});
        const int64_t last = std::min(s.len_q, q0 + kTile) - 1;
        costs.push_back(std::min(kTile, s.len_q - q0) * visible_keys(s, last) * dim);
      }
    }
  }

  // The rows an item reads: its queries (from row q0 of its head), the keys and values of its kv head
  // (from row 0) up to key_rows (the tiles it visits), and the output rows it writes.
  struct ItemRows {
    const scalar_t *q, *k, *v;
    scalar_t* o;
    int64_t kv_head, rows, key_end, key_rows;
  };
  auto item_rows = [&](int64_t index) {
    const auto [si, h, q0] = items[index];
    const MixedMaskSample& s = samples[si];
    const int64_t kv_head = h / group, rows = std::min(kTile, s.len_q - q0);
    const int64_t key_end = visible_keys(s, q0 + rows - 1);  // tiles at or past it are fully masked
    return ItemRows{q + attention_offset(a.q_strides, s, s.q_start, q0, h),
                    k + attention_offset(a.k_strides, s, s.k_start, 0, kv_head),
                    v + attention_offset(a.v_strides, s, s.k_start, 0, kv_head),
                    o + attention_offset(o_strides, s, s.q_start, q0, h),
                    kv_head,
                    rows,
                    key_end,
                    std::min(s.len_k, ceil_div(key_end, kTile) * kTile)};
  };

  parallel_over_items(costs, [&](int64_t begin, int64_t end) {
    HeadRows<T> k_rows(dim, max_len_k), v_rows(dim, max_len_k);
    std::vector<T> buffer;
    T* qt = aligned_zeros(buffer, dim * kTile + 2 * kTile * dp + kTile * kTile);  // [dim, kTile]: the
                                   // block's queries, scaled, transposed
    T* qr = qt + dim * kTile;      // [kTile, dp]: the block's queries, converted (half, bfloat16)
    T* acc = qr + kTile * dp;      // [kTile, dp]: the output rows
    T* st = acc + kTile * dp;      // [kTile keys, kTile queries]: scores, then probabilities
    alignas(64) T col_max[kTile];
    alignas(64) T col_sum[kTile];
    alignas(64) T alpha[kTile];
    alignas(64) LaneInt<T> visible[kTile];
    for (int64_t index = begin; index < end; ++index) {
      const auto [si, h, q0] = items[index];
      const MixedMaskSample& s = samples[si];
      const ItemRows item = item_rows(index);
      const int64_t rows = item.rows, key_end = item.key_end;
      k_rows.load(si, item.kv_head, item.k, a.k_strides.token, item.key_rows);
      v_rows.load(si, item.kv_head, item.v, a.v_strides.token, item.key_rows);
      if constexpr (std::is_same_v<scalar_t, T>) {  // transposed straight from the input rows
        kernels.transpose(item.q, a.q_strides.token, rows, dim, scale2, qt);
      } else {
        load_rows(item.q, a.q_strides.token, rows, dim, qr, dp);
        kernels.transpose(qr, dp, rows, dim, scale2, qt);
      }
      for (int64_t i = 0; i < kTile; ++i) {  // padding lanes copy the last query (never written out)
        visible[i] = static_cast<LaneInt<T>>(visible_keys(s, q0 + std::min(i, rows - 1)));
        col_max[i] = -std::numeric_limits<T>::infinity();
        col_sum[i] = 0;
      }
      std::fill(acc, acc + rows * dp, T(0));
      // The rows the next item reads first and the rows it writes, prefetched a slice per key tile.
      const bool prefetch = index + 1 < end;
      const ItemRows next = prefetch ? item_rows(index + 1) : item;
      const int64_t next_kv = prefetch ? k_rows.first_to_load(items[index + 1].sample, next.kv_head) : 0;
      const int64_t tiles = ceil_div(key_end, kTile);
      const int64_t query_step = ceil_div(next.rows, tiles);
      const int64_t key_step = ceil_div(std::max<int64_t>(0, next.key_rows - next_kv), tiles);
      for (int64_t k0 = 0, t = 0; k0 < key_end; k0 += kTile, ++t) {
        if (prefetch) {  // slice t of each: rows [first + t * step, first + (t + 1) * step)
          const int64_t q_first = std::min(next.rows, t * query_step);
          const int64_t q_last = std::min(next.rows, q_first + query_step);
          const int64_t kv_first = std::min(next.key_rows, next_kv + t * key_step);
          const int64_t kv_last = std::min(next.key_rows, kv_first + key_step);
          prefetch_rows<false>(next.q, a.q_strides.token, q_first, q_last, dim);
          prefetch_rows<false>(next.k, a.k_strides.token, kv_first, kv_last, dim);
          prefetch_rows<false>(next.v, a.v_strides.token, kv_first, kv_last, dim);
          prefetch_rows<true>(next.o, o_strides.token, q_first, q_last, dim);
        }
        const int64_t keys = std::min(kTile, s.len_k - k0);
        const bool masked = visible[0] < k0 + keys;  // else every query sees every key here
        kernels.gemm_set(k_rows.row(k0), dp, qt, kTile, st, kTile, keys, dim, kTile);  // S^T = K Q^T
        kernels.softmax_columns(st, keys, k0, masked ? visible : nullptr, col_max, col_sum, alpha);
        if (k0 > 0) kernels.scale_rows(acc, dp, rows, dp, alpha);  // the first tile starts from zeros
        if (!masked) {
          kernels.gemm_add_ta(st, kTile, v_rows.row(k0), dp, acc, dp, rows, keys, dp);  // out += P V
        } else {
          add_product_over_ranges<true>(kernels.gemm_add_ta, st, kTile, v_rows.row(k0), dp, acc, dp, rows,
                                        dp, [&](int64_t i) {
                                          return std::pair<int64_t, int64_t>(
                                              0, std::clamp<int64_t>(visible[i] - k0, 0, keys));
                                        });
        }
      }
      scalar_t* o_rows = item.o;
      T* lse_rows = lse_out + attention_offset(lse_strides, s, s.q_start, q0, h);
      for (int64_t i = 0; i < rows; ++i) {
        const T inverse = T(1) / col_sum[i];  // every query sees key 0 at least: the sum is >= 1
        for (int64_t d = 0; d < dim; ++d) o_rows[i * o_strides.token + d] = static_cast<scalar_t>(acc[i * dp + d] * inverse);
        lse_rows[i] = (col_max[i] + std::log2(col_sum[i])) * static_cast<T>(M_LN2);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> mixed_mask_attention_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& sep,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    int64_t max_seqlen_q, int64_t max_seqlen_k, double softmax_scale) {
  const auto args = check_mixed_mask_attention_inputs(q, k, v, sep, cu_seqlens_q, cu_seqlens_k,
                                                      max_seqlen_q, max_seqlen_k, softmax_scale);
  const auto samples = mixed_mask_attention_samples(args);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty(args.lse_shape(), q.options().dtype(args.lse_dtype()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mixed_mask_attention_cpu", [&] {
    forward_kernel<scalar_t>(args, samples, out, lse);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(glm_ext, CPU, m) { m.impl("mixed_mask_attention", &mixed_mask_attention_cpu); }

}  // namespace glm_ext::attention_cpu
