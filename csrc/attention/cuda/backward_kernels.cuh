// Backward kernels of mixed_mask_attention on CUDA (flash-attention 2 recomputation on mma.sync,
// sm_80+), deterministic by construction: every gradient element is owned by one warp and summed
// in a fixed order, with no atomics.
//
//   delta:  delta = rowsum(grad_out * out) - grad_lse per query row (laid out like lse).
//   dK, dV: one block per (key block, key/value head, sample); each warp owns 16 keys. The block
//           walks every query head of its group and every query block that sees its keys,
//           computing the transposed tiles S^T = K Q^T, P^T = exp(S^T - lse), dP^T = V dO^T and
//           dS^T = P^T (dP^T - delta) with keys as rows, so that dV += P^T dO and dK += dS^T Q
//           take P^T and dS^T straight from registers.
//   dQ:     one block per (query block, query head, sample), walking the visible key tiles like
//           the forward: S, P, dP = dO V^T, dS, dQ += dS K.
// The dQ pass recomputes S and dP (7 tile products per tile instead of flash-attention 2's 5
// with atomic dQ updates): the price of a deterministic result without a dQ workspace.
#pragma once

#include <utility>

#include "flash_params.h"
#include "flash_primitives.cuh"

namespace glm_ext::cuda::flash {

constexpr float kLog2e = 1.4426950408889634f;

// delta, with 8 lanes per (token, head) row of grad_out and out.
template <typename T, int D>
__global__ void delta_kernel(const BackwardParams p, int64_t num_rows) {
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 8;
  const int sub = threadIdx.x % 8;
  float sum = 0.f;
  int64_t batch = 0, token = 0, head = 0;
  if (row < num_rows) {
    head = row % p.heads_q;
    token = (row / p.heads_q) % p.seq_q;
    batch = row / (p.heads_q * p.seq_q);
    const T* grad_out = static_cast<const T*>(p.grad_out) + p.grad_out_strides.offset(batch, token, head);
    const T* out = static_cast<const T*>(p.out) + p.out_strides.offset(batch, token, head);
#pragma unroll
    for (int c = sub; c < D / 8; c += 8) {
      const uint4 a = *reinterpret_cast<const uint4*>(grad_out + c * 8);
      const uint4 b = *reinterpret_cast<const uint4*>(out + c * 8);
      for (auto [x, y] : {std::pair{a.x, b.x}, std::pair{a.y, b.y}, std::pair{a.z, b.z}, std::pair{a.w, b.w}}) {
        const float2 u = MmaTraits<T>::unpack(x), w = MmaTraits<T>::unpack(y);
        sum += u.x * w.x + u.y * w.y;
      }
    }
  }
#pragma unroll
  for (int width = 4; width >= 1; width /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, width);
  if (row < num_rows && sub == 0) {
    const int64_t at = p.lse_strides.offset(batch, token, head);
    p.delta[at] = p.grad_lse ? sum - p.grad_lse[at] : sum;
  }
}

template <typename T, int D>
struct BackwardConfig {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kRows = 16 * kWarps;  // keys per dK/dV block, queries per dQ block
  // Queries per dK/dV step, keys per dQ step: 32 at head_dim 128 keeps the dK and dV
  // accumulators and two score tiles within 255 registers.
  static constexpr int kStep = D <= 64 ? 64 : 32;
  using RowTile = SmemTile<T, kRows, D>;
  using StepTile = SmemTile<T, kStep, D>;
  // dK/dV: K and V, then two stages of (Q, dO, lse, delta). dQ: Q and dO, then two of (K, V).
  static constexpr int kSmemBytes =
      (2 * RowTile::kElements + 4 * StepTile::kElements) * sizeof(T) + 4 * kStep * sizeof(float);
};

template <typename T, int D>
__global__ void __launch_bounds__(BackwardConfig<T, D>::kThreads)
    grad_key_value_kernel(const BackwardParams p) {
  using Config = BackwardConfig<T, D>;
  constexpr int kBlockN = Config::kRows, kBlockM = Config::kStep, kThreads = Config::kThreads;
  constexpr int kTilesM = kBlockM / 8, kTilesD = D / 8;

  Sample sample;
  if (!resolve_sample(p, blockIdx.z, sample)) return;
  const int n0 = blockIdx.x * kBlockN;
  if (n0 >= sample.len_k) return;
  const int kv_head = blockIdx.y, group = p.heads_q / p.heads_kv;
  const int rows_k = min(kBlockN, sample.len_k - n0);
  // The first query that sees key n0 (and so any key of the block): every query when n0 < sep.
  const int first_query = n0 < sample.sep ? 0 : max(0, n0 - (sample.len_k - sample.len_q));
  const int first_block = first_query / kBlockM;
  const int blocks_per_head = max(0, (sample.len_q + kBlockM - 1) / kBlockM - first_block);
  const int steps = group * blocks_per_head;

  extern __shared__ __align__(128) unsigned char smem[];
  T* base = reinterpret_cast<T*>(smem);
  const typename Config::RowTile k_tile{base}, v_tile{base + Config::RowTile::kElements};
  // Stage i: Q, dO, then (after both stages) lse in log2 units and delta. Pointer arithmetic
  // rather than arrays of tiles, which a run-time index would put in local memory.
  T* stages = base + 2 * Config::RowTile::kElements;
  float* stats = reinterpret_cast<float*>(stages + 4 * Config::StepTile::kElements);
  auto q_tile = [&](int stage) { return typename Config::StepTile{stages + 2 * stage * Config::StepTile::kElements}; };
  auto do_tile = [&](int stage) {
    return typename Config::StepTile{stages + (2 * stage + 1) * Config::StepTile::kElements};
  };
  auto lse_tile = [&](int stage) { return stats + 2 * stage * kBlockM; };
  auto delta_tile = [&](int stage) { return stats + (2 * stage + 1) * kBlockM; };

  const T* k = static_cast<const T*>(p.k) + p.k_strides.offset(sample.batch, sample.k_start + n0, kv_head);
  const T* v = static_cast<const T*>(p.v) + p.v_strides.offset(sample.batch, sample.k_start + n0, kv_head);
  k_tile.template load_async<kThreads>(k, p.k_strides.token, rows_k);
  v_tile.template load_async<kThreads>(v, p.v_strides.token, rows_k);
  auto step_head = [&](int step) { return kv_head * group + step / blocks_per_head; };
  auto step_start = [&](int step) { return (first_block + step % blocks_per_head) * kBlockM; };
  auto load_step = [&](int step, int stage) {
    const int head = step_head(step), m0 = step_start(step);
    const int64_t token = sample.q_start + m0;
    q_tile(stage).template load_async<kThreads>(
        static_cast<const T*>(p.q) + p.q_strides.offset(sample.batch, token, head), p.q_strides.token,
        sample.len_q - m0);
    do_tile(stage).template load_async<kThreads>(
        static_cast<const T*>(p.grad_out) + p.grad_out_strides.offset(sample.batch, token, head),
        p.grad_out_strides.token, sample.len_q - m0);
    for (int i = threadIdx.x; i < kBlockM; i += kThreads) {
      const bool inside = m0 + i < sample.len_q;
      const int64_t at = p.lse_strides.offset(sample.batch, token + i, head);
      lse_tile(stage)[i] = inside ? p.lse[at] * kLog2e : 0.f;
      delta_tile(stage)[i] = inside ? p.delta[at] : 0.f;
    }
  };
  if (steps > 0) load_step(0, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int key_row = warp * 16 + g;  // this thread's keys: key_row and key_row + 8 of the block
  FragC grad_k[kTilesD] = {}, grad_v[kTilesD] = {};

  for (int step = 0; step < steps; ++step) {
    if (step + 1 < steps) load_step(step + 1, (step + 1) % 2);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const auto queries = q_tile(step % 2), grad_outs = do_tile(step % 2);
    const float* lse = lse_tile(step % 2);
    const float* delta = delta_tile(step % 2);
    const int m0 = step_start(step);

    // S^T = K Q^T and dP^T = V dO^T (keys x queries).
    FragC s[kTilesM] = {}, dp[kTilesM] = {};
    mma_rows_by_tile_transposed<T, kBlockM, D>(s, k_tile, warp * 16, queries);
    mma_rows_by_tile_transposed<T, kBlockM, D>(dp, v_tile, warp * 16, grad_outs);
    // P^T = exp(S^T - lse) where the query sees the key (and is a real query), and
    // dS^T = P^T (dP^T - delta).
    const bool needs_mask = m0 + kBlockM > sample.len_q || n0 + kBlockN > sample.visible_keys(m0);
#pragma unroll
    for (int t = 0; t < kTilesM; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int query = t * 8 + 2 * c + (e & 1), key = n0 + key_row + 8 * (e / 2);
        const bool seen = !needs_mask || (m0 + query < sample.len_q && key < sample.visible_keys(m0 + query));
        const float prob = seen ? exp2f(s[t].x[e] * p.scale_log2 - lse[query]) : 0.f;
        s[t].x[e] = prob;
        dp[t].x[e] = prob * (dp[t].x[e] - delta[query]);
      }
    }
    mma_fragments_by_tile<T, kBlockM, D>(grad_v, s, grad_outs);  // dV += P^T dO
    mma_fragments_by_tile<T, kBlockM, D>(grad_k, dp, queries);    // dK += dS^T Q
    __syncthreads();  // the next iteration's copy overwrites this stage
  }
  cp_async_wait<0>();
  __syncthreads();

  // Each warp stages its 16 rows of dK (scaled: S was) and dV in the K and V tiles, then stores.
  stage_rows<T, D>(k_tile, warp * 16, grad_k, {p.softmax_scale, p.softmax_scale});
  stage_rows<T, D>(v_tile, warp * 16, grad_v, {1.f, 1.f});
  __syncwarp();
  const int warp_rows = min(16, rows_k - warp * 16);
  const int64_t token = sample.k_start + n0 + warp * 16;
  k_tile.store_rows(warp * 16, warp_rows,
                    static_cast<T*>(p.grad_k) + p.grad_k_strides.offset(sample.batch, token, kv_head),
                    p.grad_k_strides.token);
  v_tile.store_rows(warp * 16, warp_rows,
                    static_cast<T*>(p.grad_v) + p.grad_v_strides.offset(sample.batch, token, kv_head),
                    p.grad_v_strides.token);
}

template <typename T, int D>
__global__ void __launch_bounds__(BackwardConfig<T, D>::kThreads)
    grad_query_kernel(const BackwardParams p) {
  using Config = BackwardConfig<T, D>;
  constexpr int kBlockM = Config::kRows, kBlockN = Config::kStep, kThreads = Config::kThreads;
  constexpr int kTilesN = kBlockN / 8, kTilesD = D / 8;

  QueryBlock block;
  if (!block.template resolve<kBlockM, kBlockN>(p)) return;
  const Sample& sample = block.sample;
  const int m0 = block.m0, rows_q = block.rows, head = block.head;

  extern __shared__ __align__(128) unsigned char smem[];
  T* base = reinterpret_cast<T*>(smem);
  const typename Config::RowTile q_tile{base}, do_tile{base + Config::RowTile::kElements};
  const KeyValueStages<T, kBlockN, D> stages{base + 2 * Config::RowTile::kElements};
  auto load_kv = [&](int tile, int stage) {
    stages.template load_async<kThreads>(p, sample, block.kv_head, tile, stage);
  };
  const int64_t token = sample.q_start + m0;
  q_tile.template load_async<kThreads>(
      static_cast<const T*>(p.q) + p.q_strides.offset(sample.batch, token, head), p.q_strides.token, rows_q);
  do_tile.template load_async<kThreads>(
      static_cast<const T*>(p.grad_out) + p.grad_out_strides.offset(sample.batch, token, head),
      p.grad_out_strides.token, rows_q);
  if (block.num_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int row0 = warp * 16 + g;  // this thread's rows: row0 and row0 + 8 of the block
  int visible[2];
  float lse[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    const int64_t at = p.lse_strides.offset(sample.batch, token + row, head);
    visible[r] = sample.visible_keys(m0 + row);
    lse[r] = row < rows_q ? p.lse[at] * kLog2e : 0.f;
    delta[r] = row < rows_q ? p.delta[at] : 0.f;
  }
  FragC grad_q[kTilesD] = {};

  for (int j = 0; j < block.num_tiles; ++j) {
    if (j + 1 < block.num_tiles) load_kv(j + 1, (j + 1) % 2);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const auto keys = stages.keys(j % 2), values = stages.values(j % 2);

    // S = Q K^T and dP = dO V^T (queries x keys).
    FragC s[kTilesN] = {}, dp[kTilesN] = {};
    mma_rows_by_tile_transposed<T, kBlockN, D>(s, q_tile, warp * 16, keys);
    mma_rows_by_tile_transposed<T, kBlockN, D>(dp, do_tile, warp * 16, values);
    // P = exp(S - lse) on the keys the row sees, dS = P (dP - delta).
    const int n0 = j * kBlockN;
    const bool needs_mask = n0 + kBlockN > block.unmasked_end;
#pragma unroll
    for (int t = 0; t < kTilesN; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + t * 8 + 2 * c + (e & 1), r = e / 2;
        const float prob = needs_mask && col >= visible[r] ? 0.f : exp2f(s[t].x[e] * p.scale_log2 - lse[r]);
        dp[t].x[e] = prob * (dp[t].x[e] - delta[r]);
      }
    }
    mma_fragments_by_tile<T, kBlockN, D>(grad_q, dp, keys);  // dQ += dS K
    __syncthreads();  // the next iteration's copy overwrites this stage
  }
  cp_async_wait<0>();
  __syncthreads();

  // Each warp stages its 16 rows of dQ (scaled: S was) in the Q tile, then stores them.
  stage_rows<T, D>(q_tile, warp * 16, grad_q, {p.softmax_scale, p.softmax_scale});
  __syncwarp();
  q_tile.store_rows(warp * 16, min(16, rows_q - warp * 16),
                    static_cast<T*>(p.grad_q) + p.grad_q_strides.offset(sample.batch, token + warp * 16, head),
                    p.grad_q_strides.token);
}

inline unsigned blocks_of(int64_t rows, int64_t block_rows) {
  return static_cast<unsigned>((rows + block_rows - 1) / block_rows);
}

// delta_kernel: 8 threads per (token, head) row of the query side, in blocks of kDeltaThreads.
constexpr int kDeltaThreads = 256;
inline int64_t delta_rows(const BackwardParams& p) {
  return (p.cu_seqlens_q ? 1 : p.num_samples) * p.seq_q * p.heads_q;
}

// Key blocks (covering max_seqlen_k keys) x key/value heads x samples.
template <typename T, int D>
inline dim3 grad_key_value_grid(const BackwardParams& p, int64_t max_seqlen_k) {
  return dim3(blocks_of(max_seqlen_k, BackwardConfig<T, D>::kRows), p.heads_kv, p.num_samples);
}

// Query blocks (covering max_seqlen_q rows) x query heads x samples.
template <typename T, int D>
inline dim3 grad_query_grid(const BackwardParams& p, int64_t max_seqlen_q) {
  return dim3(blocks_of(max_seqlen_q, BackwardConfig<T, D>::kRows), p.heads_q, p.num_samples);
}

}  // namespace glm_ext::cuda::flash
