// Forward kernel of mixed_mask_attention on CUDA (flash-attention 2 on mma.sync, sm_80+).
//
// One block of kWarps warps per (query block of 16 * kWarps rows, query head, sample); each warp
// owns 16 query rows. The block walks the key tiles its rows can see, two stages deep (cp.async
// copies tile j + 1 while tile j is computed): S = Q K^T in registers, the mask, the online
// softmax, O += P V with P taken straight from S's registers. A row sees the key prefix
// [0, visible) (flash_params.h), so the walk stops at the last row's prefix: fully masked tiles
// are never loaded, and the element mask runs only on tiles past the first row's prefix (those
// that straddle sep, the diagonal or the end of the keys).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "flash_kernels.h"
#include "flash_primitives.cuh"

namespace glm_ext::cuda::flash {
namespace {

constexpr float kLn2 = 0.693147180559945309f;

template <typename T, int D>
struct ForwardConfig {
  static constexpr int kWarps = 4;
  static constexpr int kBlockM = 16 * kWarps;  // query rows per block
  static constexpr int kBlockN = 64;           // keys per tile
  static constexpr int kThreads = 32 * kWarps;
  using QTile = SmemTile<T, kBlockM, D>;
  using KVTile = SmemTile<T, kBlockN, D>;
  // Q, then two stages of (K, V).
  static constexpr int kSmemBytes = (QTile::kElements + 4 * KVTile::kElements) * sizeof(T);
};

template <typename T, int D>
__global__ void __launch_bounds__(ForwardConfig<T, D>::kThreads)
    mixed_mask_forward_kernel(const ForwardParams p) {
  using Config = ForwardConfig<T, D>;
  constexpr int kBlockM = Config::kBlockM, kBlockN = Config::kBlockN, kThreads = Config::kThreads;
  constexpr int kTilesN = kBlockN / 8, kTilesD = D / 8;

  Sample sample;
  if (!resolve_sample(p, blockIdx.z, sample)) return;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;  // the longest key walks start first
  if (m0 >= sample.len_q) return;
  const int head = blockIdx.y, kv_head = head / (p.heads_q / p.heads_kv);
  const int rows_q = min(kBlockM, sample.len_q - m0);
  const int key_end = sample.visible_keys(m0 + rows_q - 1);  // keys any row of the block sees
  const int unmasked_end = sample.visible_keys(m0);          // keys every row sees
  const int num_tiles = (key_end + kBlockN - 1) / kBlockN;

  extern __shared__ __align__(128) unsigned char smem[];
  T* base = reinterpret_cast<T*>(smem);
  const typename Config::QTile q_tile{base};
  // Stage i holds K at stages + 2 i kElements and V right after it (pointer arithmetic rather
  // than an array of tiles, which a run-time index would put in local memory).
  T* stages = base + Config::QTile::kElements;
  auto k_tile = [&](int stage) { return typename Config::KVTile{stages + 2 * stage * Config::KVTile::kElements}; };
  auto v_tile = [&](int stage) { return typename Config::KVTile{stages + (2 * stage + 1) * Config::KVTile::kElements}; };

  const T* q = static_cast<const T*>(p.q) + offset_of(p.q_strides, sample.batch, sample.q_start + m0, head);
  const T* k = static_cast<const T*>(p.k) + offset_of(p.k_strides, sample.batch, sample.k_start, kv_head);
  const T* v = static_cast<const T*>(p.v) + offset_of(p.v_strides, sample.batch, sample.k_start, kv_head);
  auto load_kv = [&](int tile, int stage) {
    const int n0 = tile * kBlockN;
    k_tile(stage).template load_async<kThreads>(k + n0 * p.k_strides.token, p.k_strides.token, sample.len_k - n0);
    v_tile(stage).template load_async<kThreads>(v + n0 * p.v_strides.token, p.v_strides.token, sample.len_k - n0);
  };
  q_tile.template load_async<kThreads>(q, p.q_strides.token, rows_q);
  if (num_tiles > 0) load_kv(0, 0);
  cp_async_commit();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
  const int row0 = warp * 16 + g;  // this thread's rows: row0 and row0 + 8 of the block
  const int visible[2] = {sample.visible_keys(m0 + row0), sample.visible_keys(m0 + row0 + 8)};
  FragA q_frag[D / 16];
  FragC acc[kTilesD] = {};
  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.f, 0.f};

  for (int j = 0; j < num_tiles; ++j) {
    if (j + 1 < num_tiles) load_kv(j + 1, (j + 1) % 2);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const auto keys = k_tile(j % 2), values = v_tile(j % 2);
    if (j == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) q_frag[kk] = q_tile.operand_a(warp * 16, kk * 16);
    }

    // S = Q K^T, then scaled to log2 units and masked.
    FragC s[kTilesN] = {};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int t = 0; t < kTilesN; t += 2) {
        FragB b0, b1;
        keys.operand_b_transposed(t * 8, kk * 16, b0, b1);
        MmaTraits<T>::mma(s[t], q_frag[kk], b0);
        MmaTraits<T>::mma(s[t + 1], q_frag[kk], b1);
      }
    }
    const int n0 = j * kBlockN;
    const bool needs_mask = n0 + kBlockN > unmasked_end;
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

    // O += P V.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const FragA p_frag = to_operand_a<T>(s[2 * kk], s[2 * kk + 1]);
#pragma unroll
      for (int t = 0; t < kTilesD; t += 2) {
        FragB b0, b1;
        values.operand_b(kk * 16, t * 8, b0, b1);
        MmaTraits<T>::mma(acc[t], p_frag, b0);
        MmaTraits<T>::mma(acc[t + 1], p_frag, b1);
      }
    }
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
      p.lse[sample.batch * p.lse_batch_stride + head * p.lse_head_stride + sample.q_start + m0 + row] = lse;
    }
  }
#pragma unroll
  for (int t = 0; t < kTilesD; ++t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t packed = MmaTraits<T>::pack(acc[t].x[2 * r] * inverse[r], acc[t].x[2 * r + 1] * inverse[r]);
      *reinterpret_cast<uint32_t*>(q_tile.chunk(row0 + 8 * r, t) + 2 * c) = packed;
    }
  }
  __syncwarp();
  T* out = static_cast<T*>(p.out) + offset_of(p.out_strides, sample.batch, sample.q_start + m0, head);
  q_tile.store_rows(warp * 16, min(16, rows_q - warp * 16), out + warp * 16 * p.out_strides.token,
                    p.out_strides.token);
}

template <typename T, int D>
void launch(const ForwardParams& params, int num_query_blocks, cudaStream_t stream) {
  using Config = ForwardConfig<T, D>;
  const auto kernel = mixed_mask_forward_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Config::kSmemBytes));
  const dim3 grid(num_query_blocks, params.heads_q, params.num_samples);
  kernel<<<grid, Config::kThreads, Config::kSmemBytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

template <typename T, int D>
void run_forward(const ForwardParams& params, int64_t max_seqlen_q, cudaStream_t stream) {
  const int64_t blocks = (max_seqlen_q + ForwardConfig<T, D>::kBlockM - 1) / ForwardConfig<T, D>::kBlockM;
  if (blocks > 0) launch<T, D>(params, static_cast<int>(blocks), stream);
}

#define GLM_EXT_INSTANTIATE(T, D) template void run_forward<T, D>(const ForwardParams&, int64_t, cudaStream_t);
GLM_EXT_FLASH_FOR_EACH_CONFIG(GLM_EXT_INSTANTIATE)
#undef GLM_EXT_INSTANTIATE

}  // namespace glm_ext::cuda::flash
