// CPU backward of mixed_mask_attention: flash-attention 2's recomputation from the saved lse, no
// seq x seq buffer, deterministic.
//
// After delta = rowsum(grad_out * out) - grad_lse per query (a small pre-pass), one work item per
// (sample, kv head, chunk of its key blocks), in parallel. An item walks the query heads of its
// group, then the query blocks that see its keys, then the key tiles of the chunk each block sees,
// with 5 tile products per tile: S^T = K Q^T and dP^T = V dO^T (scores recomputed as in the
// forward), then dV += P^T dO, dK += dS^T Q and dQ += dS K, in the item's float buffers (its keys'
// dK and dV, one query block's dQ; memory linear in the chunk's length). A sample's key
// blocks form one chunk when there are enough (sample, kv head) pairs to keep every thread busy,
// else a few chunks of about equal work; dQ is then summed over the chunks' partial sums in chunk
// order. Every output element is written once, its terms summed in a fixed order: race-free and
// deterministic (for a given thread count, which sets the chunks).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cmath>

#include "attention/cpu/attention_cpu.h"

namespace glm_ext::attention_cpu {
namespace {

struct KeyChunk {
  int64_t sample, kv_head, chunk;
  int64_t k_begin, k_end;  // keys [k_begin, k_end), a multiple of kTile apart
};

// Multiply-adds of key block [k0, k0 + kTile) of a sample for one query head: its keys times the
// queries that see them (an upper bound, up to the diagonal tile).
int64_t key_block_work(const MixedMaskSample& s, int64_t k0, int64_t dim) {
  return std::min(kTile, s.len_k - k0) * std::max<int64_t>(0, s.len_q - first_query_seeing(s, k0)) * dim;
}

// How many chunks each sample's key blocks are cut into: one when the (sample, kv head) pairs
// split evenly over the threads or outnumber them four to one, else the fewest that do.
int64_t chunks_per_sample(int64_t head_pairs, int64_t max_blocks, int64_t threads) {
  int64_t chunks = 1;
  while (chunks < max_blocks && (head_pairs * chunks) % threads != 0 && head_pairs * chunks < 4 * threads) ++chunks;
  return chunks;
}

// The work items: each sample's key blocks cut into at most `chunks` runs of about equal work.
std::vector<KeyChunk> key_chunks(const std::vector<MixedMaskSample>& samples, int64_t heads_kv, int64_t chunks,
                                 int64_t dim) {
  std::vector<KeyChunk> items;
  for (int64_t si = 0; si < static_cast<int64_t>(samples.size()); ++si) {
    const MixedMaskSample& s = samples[si];
    if (s.len_k == 0) continue;
    std::vector<int64_t> starts = {0};
    int64_t total = 0, done = 0;
    for (int64_t k0 = 0; k0 < s.len_k; k0 += kTile) total += key_block_work(s, k0, dim);
    for (int64_t k0 = 0; k0 < s.len_k; k0 += kTile) {
      const int64_t next = done + key_block_work(s, k0, dim);
      const int64_t cut = total * static_cast<int64_t>(starts.size()) / chunks;
      if (k0 > 0 && static_cast<int64_t>(starts.size()) < chunks && done + (next - done) / 2 >= cut) starts.push_back(k0);
      done = next;
    }
    starts.push_back(s.len_k);
    for (int64_t kv_head = 0; kv_head < heads_kv; ++kv_head) {
      for (size_t c = 0; c + 1 < starts.size(); ++c) items.push_back({si, kv_head, static_cast<int64_t>(c), starts[c], starts[c + 1]});
    }
  }
  return items;
}

template <typename scalar_t>
void backward_kernel(const MixedMaskAttentionBackwardArgs& b, const std::vector<MixedMaskSample>& samples,
                     at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  using T = AccType<scalar_t>;
  const TileKernels<T>& kernels = tile_kernels<T>();
  const MixedMaskAttentionArgs& a = b.forward;
  const int64_t dim = a.head_dim, dp = padded_head_dim<T>(dim);
  const int64_t group = a.heads_q / a.heads_kv;
  const T scale = static_cast<T>(a.softmax_scale), scale2 = static_cast<T>(a.softmax_scale * M_LOG2E);
  const scalar_t* q = a.q.const_data_ptr<scalar_t>();
  const scalar_t* k = a.k.const_data_ptr<scalar_t>();
  const scalar_t* v = a.v.const_data_ptr<scalar_t>();
  const scalar_t* go = b.grad_out.const_data_ptr<scalar_t>();
  const scalar_t* o = b.out.const_data_ptr<scalar_t>();
  const T* lse = b.lse.const_data_ptr<T>();
  const T* grad_lse = b.grad_lse.defined() ? b.grad_lse.const_data_ptr<T>() : nullptr;
  const TokenStrides lse_strides = a.lse_strides();
  const TokenStrides gq_strides = token_strides(grad_q), gk_strides = token_strides(grad_k);  // grad_v: as grad_k
  scalar_t* gq = grad_q.mutable_data_ptr<scalar_t>();
  scalar_t* gk = grad_k.mutable_data_ptr<scalar_t>();
  scalar_t* gv = grad_v.mutable_data_ptr<scalar_t>();

  // delta = rowsum(grad_out * out) - grad_lse, laid out like lse.
  auto delta_tensor = at::empty(a.lse_shape(), b.lse.options());
  T* delta = delta_tensor.mutable_data_ptr<T>();
  std::vector<std::pair<int64_t, int64_t>> heads;  // (sample, query head)
  std::vector<int64_t> head_costs;
  for (int64_t si = 0; si < static_cast<int64_t>(samples.size()); ++si) {
    for (int64_t h = 0; h < a.heads_q; ++h) {
      heads.emplace_back(si, h);
      head_costs.push_back(samples[si].len_q * dim);
    }
  }
  parallel_over_items(head_costs, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const auto [si, h] = heads[index];
      const MixedMaskSample& s = samples[si];
      for (int64_t i = 0; i < s.len_q; ++i) {
        const scalar_t* g = go + attention_offset(b.grad_out_strides, s, s.q_start, i, h);
        const scalar_t* y = o + attention_offset(b.out_strides, s, s.q_start, i, h);
        T sum = 0;
        for (int64_t d = 0; d < dim; ++d) sum += static_cast<T>(g[d]) * static_cast<T>(y[d]);
        const int64_t at = attention_offset(lse_strides, s, s.q_start, i, h);
        delta[at] = grad_lse ? sum - grad_lse[at] : sum;
      }
    }
  });

  int64_t max_blocks = 0;
  for (const auto& s : samples) max_blocks = std::max(max_blocks, ceil_div(s.len_k, kTile));
  const int64_t head_pairs = static_cast<int64_t>(samples.size()) * a.heads_kv;
  const int64_t chunks = chunks_per_sample(head_pairs, max_blocks, at::get_num_threads());
  const std::vector<KeyChunk> items = key_chunks(samples, a.heads_kv, chunks, dim);
  std::vector<int64_t> costs;
  for (const KeyChunk& item : items) {
    int64_t work = 0;
    for (int64_t k0 = item.k_begin; k0 < item.k_end; k0 += kTile) work += key_block_work(samples[item.sample], k0, dim);
    costs.push_back(5 * group * work);
  }
  // With several chunks, each writes its partial dQ [chunk][token][query head][dp] (like q, packed
  // or not; zeros where a sample has fewer chunks); they are summed afterwards.
  at::Tensor partial_dq;
  TokenStrides partial_strides;
  if (chunks > 1) {
    partial_dq = at::zeros({chunks, (a.packed ? 1 : a.num_samples) * a.seq_q * a.heads_q * dp},
                           b.lse.options());
    partial_strides = {a.packed ? 0 : a.seq_q * a.heads_q * dp, a.heads_q * dp, dp};
  }
  const int64_t chunk_elements = chunks > 1 ? partial_dq.size(1) : 0;

  parallel_over_items(costs, [&](int64_t begin, int64_t end) {
    std::vector<T> kc_buffer, vc_buffer, dk_buffer, dv_buffer, buffer;
    T* qr = aligned_zeros(buffer, 3 * kTile * dp + 2 * dim * kTile + 2 * kTile * kTile);  // [kTile, dp]:
                                     // a block of queries
    T* gr = qr + kTile * dp;         // [kTile, dp]: their rows of grad_out
    T* dq = gr + kTile * dp;         // [kTile, dp]: their gradient
    T* qt = dq + kTile * dp;         // [dim, kTile]: the queries, scaled, transposed
    T* dot = qt + dim * kTile;       // [dim, kTile]: grad_out, transposed
    T* st = dot + dim * kTile;       // [kTile keys, kTile queries]: scores, then probabilities
    T* dpt = st + kTile * kTile;     // the same: dP, then dS
    alignas(64) T col_lse2[kTile];
    alignas(64) T col_delta[kTile];
    alignas(64) LaneInt<T> col_visible[kTile];
    int64_t first_seen[kTile];       // per key of a tile: the first query of the block that sees it
    for (int64_t index = begin; index < end; ++index) {
      const KeyChunk& item = items[index];
      const int64_t si = item.sample, kv_head = item.kv_head;
      const MixedMaskSample& s = samples[si];
      const int64_t chunk_keys = item.k_end - item.k_begin;
      // [keys of the chunk, dp]: its keys and values, their gradients
      T* kc = aligned_zeros(kc_buffer, chunk_keys * dp);
      T* vc = aligned_zeros(vc_buffer, chunk_keys * dp);
      load_rows(k + attention_offset(a.k_strides, s, s.k_start, item.k_begin, kv_head), a.k_strides.token,
                chunk_keys, dim, kc, dp);
      load_rows(v + attention_offset(a.v_strides, s, s.k_start, item.k_begin, kv_head), a.v_strides.token,
                chunk_keys, dim, vc, dp);
      T* dk = aligned_zeros(dk_buffer, chunk_keys * dp);
      T* dv = aligned_zeros(dv_buffer, chunk_keys * dp);
      // Query blocks outer, the chunk's key tiles they see inner: a block's dQ is complete when
      // its key loop ends, and only one block of queries is held at a time.
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
        for (int64_t q0 = first_query_seeing(s, item.k_begin) / kTile * kTile; q0 < s.len_q; q0 += kTile) {
          const int64_t rows = std::min(kTile, s.len_q - q0);
          const scalar_t* q_block = q + attention_offset(a.q_strides, s, s.q_start, q0, h);
          const scalar_t* go_block = go + attention_offset(b.grad_out_strides, s, s.q_start, q0, h);
          load_rows(q_block, a.q_strides.token, rows, dim, qr, dp);
          load_rows(go_block, b.grad_out_strides.token, rows, dim, gr, dp);
          kernels.transpose(qr, dp, rows, dim, scale2, qt);
          kernels.transpose(gr, dp, rows, dim, T(1), dot);
          const int64_t stat = attention_offset(lse_strides, s, s.q_start, q0, h);
          for (int64_t i = 0; i < kTile; ++i) {
            const bool real = i < rows;  // padding lanes: masked, and outside every product
            col_visible[i] = real ? static_cast<LaneInt<T>>(visible_keys(s, q0 + i)) : 0;
            col_lse2[i] = real ? lse[stat + i] * static_cast<T>(M_LOG2E) : T(0);
            col_delta[i] = real ? delta[stat + i] : T(0);
          }
          std::fill(dq, dq + rows * dp, T(0));
          const int64_t key_end = std::min<int64_t>(item.k_end, col_visible[rows - 1]);
          for (int64_t k0 = item.k_begin; k0 < key_end; k0 += kTile) {
            const int64_t keys = std::min(kTile, s.len_k - k0);
            const T* k_rows = kc + (k0 - item.k_begin) * dp;
            const T* v_rows = vc + (k0 - item.k_begin) * dp;
            T* dk_rows = dk + (k0 - item.k_begin) * dp;
            T* dv_rows = dv + (k0 - item.k_begin) * dp;
            const bool masked = col_visible[0] < k0 + keys;  // else every query sees every key here
            kernels.gemm_set(k_rows, dp, qt, kTile, st, kTile, keys, dim, kTile);    // S^T = K Q^T
            kernels.gemm_set(v_rows, dp, dot, kTile, dpt, kTile, keys, dim, kTile);  // dP^T = V dO^T
            kernels.grad_scores_columns(st, dpt, keys, k0, masked ? col_visible : nullptr, col_lse2, col_delta);
            if (!masked) {
              kernels.gemm_add(st, kTile, gr, dp, dv_rows, dp, keys, rows, dp);       // dV += P^T dO
              kernels.gemm_add(dpt, kTile, qr, dp, dk_rows, dp, keys, rows, dp);      // dK += dS^T Q
              kernels.gemm_add_ta(dpt, kTile, k_rows, dp, dq, dp, rows, keys, dp);    // dQ += dS K
              continue;
            }
            for (int64_t j = 0, f = 0; j < keys; ++j) {
              while (f < rows && col_visible[f] <= k0 + j) ++f;
              first_seen[j] = f;
            }
            auto seeing_queries = [&](int64_t j) { return std::pair<int64_t, int64_t>(first_seen[j], rows); };
            auto keys_seen = [&](int64_t i) {
              return std::pair<int64_t, int64_t>(0, std::clamp<int64_t>(col_visible[i] - k0, 0, keys));
            };
            add_product_over_ranges<false>(kernels.gemm_add, st, kTile, gr, dp, dv_rows, dp, keys, dp, seeing_queries);
            add_product_over_ranges<false>(kernels.gemm_add, dpt, kTile, qr, dp, dk_rows, dp, keys, dp, seeing_queries);
            add_product_over_ranges<true>(kernels.gemm_add_ta, dpt, kTile, k_rows, dp, dq, dp, rows, dp, keys_seen);
          }
          if (chunks == 1) {  // the only item that writes these rows
            scalar_t* gq_rows = gq + attention_offset(gq_strides, s, s.q_start, q0, h);
            for (int64_t i = 0; i < rows; ++i) {
              for (int64_t d = 0; d < dim; ++d) gq_rows[i * gq_strides.token + d] = static_cast<scalar_t>(dq[i * dp + d] * scale);
            }
          } else {
            T* partial = partial_dq.mutable_data_ptr<T>() + item.chunk * chunk_elements;
            for (int64_t i = 0; i < rows; ++i) {
              std::copy_n(dq + i * dp, dp, partial + attention_offset(partial_strides, s, s.q_start, q0 + i, h));
            }
          }
        }
      }
      scalar_t* gk_rows = gk + attention_offset(gk_strides, s, s.k_start, item.k_begin, kv_head);
      scalar_t* gv_rows = gv + attention_offset(gk_strides, s, s.k_start, item.k_begin, kv_head);
      for (int64_t j = 0; j < chunk_keys; ++j) {
        for (int64_t d = 0; d < dim; ++d) {
          gk_rows[j * gk_strides.token + d] = static_cast<scalar_t>(dk[j * dp + d] * scale);
          gv_rows[j * gk_strides.token + d] = static_cast<scalar_t>(dv[j * dp + d]);
        }
      }
    }
  });
  if (chunks == 1) return;

  // dQ = scale * (the sum of the chunks' partial sums, in chunk order).
  const T* partial = partial_dq.const_data_ptr<T>();
  parallel_over_items(head_costs, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      const auto [si, h] = heads[index];
      const MixedMaskSample& s = samples[si];
      scalar_t* gq_rows = gq + attention_offset(gq_strides, s, s.q_start, 0, h);
      for (int64_t i = 0; i < s.len_q; ++i) {
        const T* row = partial + attention_offset(partial_strides, s, s.q_start, i, h);
        for (int64_t d = 0; d < dim; ++d) {
          T sum = 0;
          for (int64_t c = 0; c < chunks; ++c) sum += row[c * chunk_elements + d];
          gq_rows[i * gq_strides.token + d] = static_cast<scalar_t>(sum * scale);
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> mixed_mask_attention_backward_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const at::Tensor& sep, const std::optional<at::Tensor>& cu_seqlens_q,
    const std::optional<at::Tensor>& cu_seqlens_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
    double softmax_scale) {
  const auto args = check_mixed_mask_attention_backward_inputs(
      grad_out, grad_lse, q, k, v, out, lse, sep, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, softmax_scale);
  const auto samples = mixed_mask_attention_samples(args.forward);
  auto grad_q = at::empty(q.sizes(), q.options());
  auto grad_k = at::empty(k.sizes(), k.options());
  auto grad_v = at::empty(v.sizes(), v.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "mixed_mask_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(args, samples, grad_q, grad_k, grad_v);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(glm_ext, CPU, m) { m.impl("mixed_mask_attention_backward", &mixed_mask_attention_backward_cpu); }

}  // namespace glm_ext::attention_cpu
