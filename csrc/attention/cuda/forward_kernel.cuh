// Forward kernel of mixed_mask_attention on CUDA (flash-attention 2 on mma.sync, sm_80+).
//
// One block of kWarps warps per (query block of 16 * kWarps rows, query head, sample); each warp
// owns 16 query rows. The block walks the key tiles its rows can see, two stages deep (cp.async
// copies tile j + 1 while tile j is computed): S = Q K^T in registers, the mask, the online
// softmax, O += P V with P taken straight from S's registers. A row sees the key prefix
// [0, visible) (flash_params.h), so the walk stops at the last row's prefix: fully masked tiles
// are never loaded, and the element mask runs only on tiles past the first row's prefix (those
// that straddle sep, the diagonal or the end of the keys).
#pragma once

#include "flash_params.h"
#include "flash_primitives.cuh"

namespace glm_ext::cuda::flash {

constexpr float kLn2 = 0.693147180559945309f;

template <typename T, int D>
struct ForwardConfig {
  static constexpr int kWarps = 4;
  static constexpr int kBlockM = 16 * kWarps;  // query rows per block
  static constexpr int kBlockN = 64;           // keys per tile
  static constexpr int kThreads = 32 * kWarps;
  using QTile = SmemTile<T, kBlockM, D>;
  // Q, then two stages of (K, V).
  static constexpr int kSmemBytes = (QTile::kElements + KeyValueStages<T, kBlockN, D>::kElements) * sizeof(T);
};

template <typename T, int D>
__global__ void __launch_bounds__(ForwardConfig<T, D>::kThreads)
    mixed_mask_forward_kernel(const ForwardParams p) {
  using Config = ForwardConfig<T, D>;
  constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN, kThreads = Config::kThreads;
  constexpr int kTilesN = kBlockN / 8, kTilesD = D / 8;

  QueryBlock block;
  if (!block.template resolve<kBlockM, kBlockN>(p)) return;
  const Sample& sample = block.sample;
  const int m0 = block.m0, rows_q = block.rows, head = block.head;

  extern __shared__ __align__(128) unsigned char smem[];
  T* base = reinterpret_cast<T*>(smem);
  const typename Config::QTile q_tile{base};
  const KeyValueStages<T, kBlockN, D> stages{base + Config::QTile::kElements};
  auto load_kv = [&](int tile, int stage) {
    stages.template load_async<kThreads>(p, sample, block.kv_head, tile, stage);
  };
  q_tile.template load_async<kThreads>(
      static_cast<const T*>(p.q) + p.q_strides.offset(sample.batch, sample.q_start + m0, head), p.q_strides.token,
      rows_q);
  if (block.num_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int row0 = warp * 16 + g;  // this thread's rows: row0 and row0 + 8 of the block
  const int visible[2] = {sample.visible_keys(m0 + row0), sample.visible_keys(m0 + row0 + 8)};
  FragC acc[kTilesD] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  for (int j = 0; j < block.num_tiles; ++j) {
    if (j + 1 < block.num_tiles) load_kv(j + 1, (j + 1) % 2);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const auto keys = stages.keys(j % 2), values = stages.values(j % 2);

    // S = Q K^T, then scaled to log2 units and masked.
    FragC s[kTilesN] = {};
    mma_rows_by_tile_transposed<T, kBlockN, D>(s, q_tile, warp * 16, keys);
    const int n0 = j * kBlockN;
    const bool needs_mask = n0 + kBlockN > block.unmasked_end;
#pragma unroll
    for (int t = 0; t < kTilesN; ++t) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + t * 8 + 2 * c + (e & 1);
        s[t].x[e] = needs_mask && col >= visible[e / 2] ? -INFINITY : s[t].x[e] * p.scale_log2;
      }
    }

    // Online softmax: rescale what was accumulated when a row's maximum grows.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = row_max[r];
#pragma unroll
      for (int t = 0; t < kTilesN; ++t) tile_max = fmaxf(tile_max, fmaxf(s[t].x[2 * r], s[t].x[2 * r + 1]));
      tile_max = quad_max(tile_max);
      const float reference = tile_max == -INFINITY ? 0.f : tile_max;  // a row with nothing seen yet
      const float correction = exp2f(row_max[r] - reference);
      row_max[r] = tile_max;
      row_sum[r] *= correction;
#pragma unroll
      for (int t = 0; t < kTilesD; ++t) {
        acc[t].x[2 * r] *= correction;
        acc[t].x[2 * r + 1] *= correction;
      }
#pragma unroll
      for (int t = 0; t < kTilesN; ++t) {
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
          s[t].x[e] = exp2f(s[t].x[e] - reference);
          row_sum[r] += s[t].x[e];
        }
      }
    }

    mma_fragments_by_tile<T, kBlockN, D>(acc, s, values);  // O += P V
    __syncthreads();  // the next iteration's copy overwrites this stage
  }
  cp_async_wait<0>();
  __syncthreads();  // no copy may still land in the Q tile, which now stages the output

  // out = acc / sum, lse = ln(sum) + max (max in log2 units). Each warp stages its own 16 rows.
  float inverse[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float sum = quad_sum(row_sum[r]);
    inverse[r] = sum > 0.f ? 1.f / sum : 0.f;
    const int row = row0 + 8 * r;
    if (c == 0 && row < rows_q) {
      const float lse = sum > 0.f ? (row_max[r] + log2f(sum)) * kLn2 : -INFINITY;
      p.lse[p.lse_strides.offset(sample.batch, sample.q_start + m0 + row, head)] = lse;
    }
  }
  stage_rows<T, D>(q_tile, warp * 16, acc, inverse);
  __syncwarp();
  T* out = static_cast<T*>(p.out) + p.out_strides.offset(sample.batch, sample.q_start + m0, head);
  q_tile.store_rows(warp * 16, min(16, rows_q - warp * 16), out + warp * 16 * p.out_strides.token,
                    p.out_strides.token);
}

// Query blocks (covering max_seqlen_q rows) x query heads x samples.
template <typename T, int D>
inline dim3 forward_grid(const ForwardParams& p, int64_t max_seqlen_q) {
  constexpr int kBlockM = ForwardConfig<T, D>::kBlockM;
  return dim3(static_cast<unsigned>((max_seqlen_q + kBlockM - 1) / kBlockM), p.heads_q, p.num_samples);
}

}  // namespace glm_ext::cuda::flash
