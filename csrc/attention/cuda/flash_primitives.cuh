// Warp-level building blocks of the mixed-mask flash-attention kernels (sm_80 and later): the
// m16n8k16 tensor-core product, ldmatrix loads of its operands from swizzled shared memory,
// cp.async tile copies, and the register layouts that tie them together.
//
// Register layouts (PTX ISA, "mma.m16n8k16"; g = lane / 4, c = lane % 4):
//   A (16 x 16, row-major), 4 registers of 2 elements: rows g / g + 8 x columns 2c, 2c + 1, then
//     the same with columns + 8: {(g, lo), (g + 8, lo), (g, hi), (g + 8, hi)}.
//   B (16 x 8, k x n), 2 registers: (k = 2c, 2c + 1; n = g), then k + 8.
//   C (16 x 8, float32), 4 values: (g, 2c), (g, 2c + 1), (g + 8, 2c), (g + 8, 2c + 1).
// Two C tiles side by side (16 x 16) hold exactly the values of one A operand, so a score tile
// computed as C becomes the A operand of the next product without leaving registers.
//
// Shared-memory tiles are [rows][D] of 16-bit elements, D a multiple of 64, stored in 16-byte
// chunks whose index is XORed with (row % 8): the 8 rows one ldmatrix reads then fall on 8
// different bank groups, and a row of chunks is still written by consecutive threads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "flash_params.h"

namespace glm_ext::cuda::flash {

// Fragments of one m16n8k16 product.
struct FragA {
  uint32_t x[4];
};
struct FragB {
  uint32_t x[2];
};
struct FragC {
  float x[4];
};

// The instructions the kernels use. When GLM_EXT_FLASH_EMULATION names a header, that header
// provides them instead: a CPU emulation of their documented semantics (python_tests/
// flash_emulator), so that the kernels' index logic is tested without a GPU.
#ifdef GLM_EXT_FLASH_EMULATION
#include GLM_EXT_FLASH_EMULATION
#else
__device__ __forceinline__ void mma_f16(FragC& d, const FragA& a, const FragB& b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
}

__device__ __forceinline__ void mma_bf16(FragC& d, const FragA& a, const FragB& b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
}

// Four 8 x 8 matrices of 16-bit elements; lane l gives the address of row l % 8 of matrix l / 8
// and receives in r[i] the elements (l / 4, 2 (l % 4) and + 1) of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(row))));
}

// The same with each matrix transposed: r[i] holds elements (2 (l % 4) and + 1, l / 4).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(static_cast<uint32_t>(__cvta_generic_to_shared(row))));
}

// 16 bytes from global to shared memory, asynchronously; zeros instead when !copy (src is then
// not read).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool copy) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(copy ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most N of this thread's committed copy groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
#endif

template <typename T>
struct MmaTraits;

template <>
struct MmaTraits<__half> {
  __device__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static float2 unpack(uint32_t pair) { return __half22float2(*reinterpret_cast<__half2*>(&pair)); }
  __device__ static void mma(FragC& d, const FragA& a, const FragB& b) { mma_f16(d, a, b); }
};

template <>
struct MmaTraits<__nv_bfloat16> {
  __device__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ static float2 unpack(uint32_t pair) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&pair));
  }
  __device__ static void mma(FragC& d, const FragA& a, const FragB& b) { mma_bf16(d, a, b); }
};

// Two C tiles (columns 0-7 and 8-15 of a 16 x 16 block) rounded to T as one A operand.
template <typename T>
__device__ __forceinline__ FragA to_operand_a(const FragC& left, const FragC& right) {
  FragA a;
  a.x[0] = MmaTraits<T>::pack(left.x[0], left.x[1]);
  a.x[1] = MmaTraits<T>::pack(left.x[2], left.x[3]);
  a.x[2] = MmaTraits<T>::pack(right.x[0], right.x[1]);
  a.x[3] = MmaTraits<T>::pack(right.x[2], right.x[3]);
  return a;
}

// A shared-memory tile of ROWS x D elements of T, swizzled as described above.
template <typename T, int ROWS, int D>
struct SmemTile {
  static_assert(D % 64 == 0, "the swizzle needs at least 8 chunks of 16 bytes per row");
  static constexpr int kChunks = D / 8;  // 16-byte chunks per row
  static constexpr int kElements = ROWS * D;
  T* data;

  __device__ T* chunk(int row, int c) const { return data + row * D + ((c ^ (row & 7)) << 3); }

  // Copies rows [0, ROWS) of a global tile (row r at src + r * row_stride; 16-byte aligned rows)
  // with cp.async; rows at or beyond `valid_rows` are filled with zeros and never read.
  template <int THREADS>
  __device__ void load_async(const T* src, int64_t row_stride, int valid_rows) const {
    constexpr int kCopies = ROWS * kChunks;
    static_assert(kCopies % THREADS == 0, "every thread copies the same number of chunks");
#pragma unroll
    for (int i = 0; i < kCopies / THREADS; ++i) {
      const int index = i * THREADS + static_cast<int>(threadIdx.x);
      const int row = index / kChunks, c = index % kChunks;
      const bool inside = row < valid_rows;
      cp_async_16(chunk(row, c), inside ? src + row * row_stride + c * 8 : src, inside);
    }
  }

  // Warp-cooperative: copies rows [row0, row0 + rows) to dst + (r - row0) * row_stride, 16 bytes
  // per access (dst 16-byte aligned, row_stride a multiple of 8).
  __device__ void store_rows(int row0, int rows, T* dst, int64_t row_stride) const {
    for (int index = threadIdx.x % 32; index < rows * kChunks; index += 32) {
      const int r = index / kChunks, c = index % kChunks;
      *reinterpret_cast<uint4*>(dst + r * row_stride + c * 8) = *reinterpret_cast<const uint4*>(chunk(row0 + r, c));
    }
  }

  // The A operand of rows [row0, row0 + 16) x columns [col0, col0 + 16) (col0 a multiple of 16),
  // stored row-major: A[i][j] = tile[row0 + i][col0 + j].
  __device__ FragA operand_a(int row0, int col0) const {
    const int lane = threadIdx.x % 32;
    FragA a;
    ldmatrix_x4(a.x, chunk(row0 + lane % 16, col0 / 8 + lane / 16));
    return a;
  }

  // Two B operands (n = 0-7 and 8-15) of the product with the tile transposed: B[k][n] =
  // tile[row0 + n][col0 + k], for rows [row0, row0 + 16) and columns [col0, col0 + 16).
  __device__ void operand_b_transposed(int row0, int col0, FragB& first, FragB& second) const {
    const int lane = threadIdx.x % 32;
    uint32_t r[4];
    ldmatrix_x4(r, chunk(row0 + lane % 8 + (lane / 16) * 8, col0 / 8 + (lane / 8) % 2));
    first = {r[0], r[1]};
    second = {r[2], r[3]};
  }

  // Two B operands (n = 0-7 and 8-15) of the product with the tile as stored: B[k][n] =
  // tile[row0 + k][col0 + n], for rows [row0, row0 + 16) and columns [col0, col0 + 16).
  __device__ void operand_b(int row0, int col0, FragB& first, FragB& second) const {
    const int lane = threadIdx.x % 32;
    uint32_t r[4];
    ldmatrix_x4_trans(r, chunk(row0 + lane % 16, col0 / 8 + lane / 16));
    first = {r[0], r[1]};
    second = {r[2], r[3]};
  }
};

// Two stages of (K, V) tiles of ROWS keys for the kernels that walk key tiles (forward, dQ):
// stage i holds K at base + 2 i Tile::kElements and V right after it (pointer arithmetic rather
// than an array of tiles, which a run-time stage index would put in local memory).
template <typename T, int ROWS, int D>
struct KeyValueStages {
  using Tile = SmemTile<T, ROWS, D>;
  static constexpr int kElements = 4 * Tile::kElements;
  T* base;

  __device__ Tile keys(int stage) const { return {base + 2 * stage * Tile::kElements}; }
  __device__ Tile values(int stage) const { return {base + (2 * stage + 1) * Tile::kElements}; }

  // Starts copying key tile `tile` of key/value head `kv_head` of `sample` into `stage`.
  template <int THREADS>
  __device__ void load_async(const ForwardParams& p, const Sample& sample, int kv_head, int tile, int stage) const {
    const int n0 = tile * ROWS;
    const int64_t token = sample.k_start + n0;
    keys(stage).template load_async<THREADS>(
        static_cast<const T*>(p.k) + p.k_strides.offset(sample.batch, token, kv_head), p.k_strides.token,
        sample.len_k - n0);
    values(stage).template load_async<THREADS>(
        static_cast<const T*>(p.v) + p.v_strides.offset(sample.batch, token, kv_head), p.v_strides.token,
        sample.len_k - n0);
  }
};

// The warp-level products of the kernels; each warp computes 16 rows. `Tile`s are SmemTiles.
//
// out[16 x N] += A[16 x D] B^T with A the rows [a_row0, a_row0 + 16) of a_tile and B the N x D
// rows of b_tile (scores: Q K^T, dO V^T, K Q^T, V dO^T).
template <typename T, int N, int D, typename ATile, typename BTile>
__device__ __forceinline__ void mma_rows_by_tile_transposed(FragC (&out)[N / 8], const ATile& a_tile, int a_row0,
                                                            const BTile& b_tile) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const FragA a = a_tile.operand_a(a_row0, kk * 16);
#pragma unroll
    for (int t = 0; t < N / 8; t += 2) {
      FragB b0, b1;
      b_tile.operand_b_transposed(t * 8, kk * 16, b0, b1);
      MmaTraits<T>::mma(out[t], a, b0);
      MmaTraits<T>::mma(out[t + 1], a, b1);
    }
  }
}

// out[16 x D] += A[16 x K] B with A given as K / 8 C fragments (probabilities or score
// gradients, rounded to T here) and B the K x D rows of b_tile (P V, P^T dO, dS^T Q, dS K).
template <typename T, int K, int D, typename BTile>
__device__ __forceinline__ void mma_fragments_by_tile(FragC (&out)[D / 8], const FragC (&a)[K / 8],
                                                      const BTile& b_tile) {
#pragma unroll
  for (int kk = 0; kk < K / 16; ++kk) {
    const FragA a_frag = to_operand_a<T>(a[2 * kk], a[2 * kk + 1]);
#pragma unroll
    for (int t = 0; t < D / 8; t += 2) {
      FragB b0, b1;
      b_tile.operand_b(kk * 16, t * 8, b0, b1);
      MmaTraits<T>::mma(out[t], a_frag, b0);
      MmaTraits<T>::mma(out[t + 1], a_frag, b1);
    }
  }
}

// Writes a warp's 16 x D accumulator, row g times row_scale[0] and row g + 8 times row_scale[1]
// (g = lane / 4), rounded to T into rows [row0, row0 + 16) of tile (the epilogues stage their
// results in shared memory, then store whole rows with store_rows).
template <typename T, int D, typename Tile>
__device__ __forceinline__ void stage_rows(const Tile& tile, int row0, const FragC (&acc)[D / 8],
                                           const float (&row_scale)[2]) {
  const int lane = threadIdx.x % 32, g = lane / 4, c = lane % 4;
#pragma unroll
  for (int t = 0; t < D / 8; ++t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      *reinterpret_cast<uint32_t*>(tile.chunk(row0 + g + 8 * r, t) + 2 * c) =
          MmaTraits<T>::pack(acc[t].x[2 * r] * row_scale[r], acc[t].x[2 * r + 1] * row_scale[r]);
    }
  }
}

// Reductions over the 4 lanes that share a row of a C fragment (lanes 4g .. 4g + 3).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace glm_ext::cuda::flash
