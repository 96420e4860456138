// The tile layer of the CPU kernels of mixed_mask_attention: products and softmax steps over
// kTile x kTile tiles, written once on GCC/Clang vector types and compiled for AVX-512, AVX2+FMA
// and the baseline (SSE2, NEON), the widest one the CPU and ATen allow being picked at run time
// (the extension itself is built without -march flags). forward.cpp and backward.cpp drive them.
//
// Tiles hold scores transposed: row j is key k0 + j, lane q is query q of the block. Every
// per-query statistic (running maximum and sum, lse, delta, the number of keys a query sees) is
// then a vector across the row, and the softmax needs no horizontal reduction. Scores are in log2
// units (the query tile is scaled by softmax_scale * log2(e)), so that probabilities are exp2.
#pragma once

#include <cstdint>
#include <type_traits>

namespace glm_ext::attention_cpu {

constexpr int64_t kTile = 64;

// The accumulation type of an input dtype: float64 for float64, float32 otherwise.
template <typename scalar_t>
using AccType = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Lane integers of the per-query key counts ("visible") that masks compare against.
template <typename T>
using LaneInt = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;

// Row buffers pad the head dimension to a multiple of the widest vector (64 bytes).
template <typename T>
constexpr int64_t kPadWidth = 64 / sizeof(T);

template <typename T>
int64_t padded_head_dim(int64_t head_dim) {
  return (head_dim + kPadWidth<T> - 1) / kPadWidth<T> * kPadWidth<T>;
}

// The kernels of one instruction set. Leading dimensions are in elements; `n` (columns of b and c)
// must be a multiple of 64 bytes, any other size may be anything.
template <typename T>
struct TileKernels {
  // c[m, n] = a[m, kd] @ b[kd, n] (gemm_set) or c += a @ b (gemm_add).
  void (*gemm_set)(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t m,
                   int64_t kd, int64_t n);
  void (*gemm_add)(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t m,
                   int64_t kd, int64_t n);
  // c += a^T @ b, a stored [kd, m].
  void (*gemm_add_ta)(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t m,
                      int64_t kd, int64_t n);
  // Online softmax (flash-attention 2) over the score tile st [keys, kTile] of keys k0..: lane q of
  // row j counts only when k0 + j < visible[q] (every lane when visible is null). Updates the
  // running maxima (moved only when passed by more than 8: a reference at most 8 below the true
  // maximum) and sums [kTile], turns st into exp2(s - max) (0 where masked) and writes alpha
  // [kTile] = exp2(old max - new max), the factor of each query's output accumulator.
  void (*softmax_columns)(T* st, int64_t keys, int64_t k0, const LaneInt<T>* visible, T* col_max,
                          T* col_sum, T* alpha);
  // Backward: st [keys, kTile] scores -> P = exp2(s - lse2) (0 where masked as above), and
  // dpt [keys, kTile] = dP -> dS = P (dP - delta); lse2 (in log2 units) and delta per query lane.
  void (*grad_scores_columns)(T* st, T* dpt, int64_t keys, int64_t k0, const LaneInt<T>* visible,
                              const T* lse2, const T* delta);
  // c[r, :n] *= alpha[r] for the rows r < m whose alpha is not 1.
  void (*scale_rows)(T* c, int64_t ldc, int64_t m, int64_t n, const T* alpha);
  // dst [dim, kTile] = scale * src[rows, dim]^T (src leading dimension ld), columns [rows, kTile) 0.
  void (*transpose)(const T* src, int64_t ld, int64_t rows, int64_t dim, T scale, T* dst);
};

// The kernels of cpu_isa(), the widest instruction set both ATen and this CPU allow.
template <typename T>
const TileKernels<T>& tile_kernels();

}  // namespace glm_ext::attention_cpu
