// CPU kernels of mixed_mask_attention (GLM_SPEC section 2): tiled online-softmax attention under
// GLM's mixed mask, forward and backward, memory linear in the sequence length.
//
// Tiles are kTile x kTile (query rows x key columns). A query row sees a prefix of the keys,
// [0, visible) with visible = min(len_k, max(sep, position + 1)), so the mask of a tile is one
// count per row: key tiles at or beyond the largest `visible` of a query block are fully masked
// and never visited; in the others the softmax compares each lane's key index with the row's
// count (one compare per lane, all true below every row's count: no mask tensor, no separate
// pass). Queries of a block see a growing prefix, so its key loop ends at the last row's count;
// in the backward, a key block starts its query loop at the first query that sees it. The
// products over a tile's keys or queries skip the masked pairs rather than weighting them by zero,
// so that a NaN in a row reaches exactly the rows that see it (as if the mask removed the pair). Scores,
// probabilities and the output accumulator are float32 (float64 for float64 inputs); bf16/fp16
// inputs are converted into small per-thread buffers, whose head dimension is padded with zeros
// to a multiple of the SIMD width.
//
// Forward: one work item per (sample, query head, query block), in parallel: online softmax over
// the visible key tiles (flash-attention 2), then out = acc / sum and lse = max + log(sum).
// Backward (flash-attention 2 recomputation from the saved lse, no seq x seq buffer), after
// delta = rowsum(grad_out * out) - grad_lse per query row (a small pre-pass):
//   fused, when there are at least as many (sample, kv head) pairs as threads: one item per pair,
//     key blocks outer, query blocks inner, 5 tile products per tile (S^T, dP^T, dV += P^T dO,
//     dK += dS^T Q, dQ += dS K), dK/dV/dQ in the item's float buffers;
//   otherwise two passes with more parallelism (7 tile products per tile):
//     pass 1, one item per (sample, kv head, key block): dV, dK of that block, over every query
//             head of its group and every query block that sees the block;
//     pass 2, one item per (sample, query head, query block): dQ of that block.
// Every output element is written by exactly one item, its terms summed in a fixed order:
// race-free and deterministic (for a given thread count when it picks the path).
//
// The tile products are register-blocked loops on GCC/Clang vector types (a 4-row block of up to
// 4 vectors of accumulators, the key/value panel read once per step for all 4 rows), compiled for
// AVX-512 (64-byte vectors), AVX2+FMA (32) and the baseline (16: SSE2, NEON) through function
// target attributes, and picked once at run time (the extension is built without -march flags).
// Work items copy the head they read into per-thread buffers once (keys transposed per tile, so
// that every product runs over contiguous rows) and reuse them for the items that follow.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "attention/attention.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define GLM_EXT_X86_KERNELS 1
#define GLM_EXT_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#define GLM_EXT_AVX2 __attribute__((target("avx2,fma")))
#else
#define GLM_EXT_X86_KERNELS 0
#endif
#define GLM_EXT_ALWAYS_INLINE inline __attribute__((always_inline))

namespace glm_ext {
namespace {

constexpr int64_t kTile = 64;

// SIMD vectors of B bytes (GCC/Clang vector extensions), the integer vector of the same lane
// count and its lane type.
template <typename T, int B>
struct Simd {
  typedef T V __attribute__((vector_size(B)));
  using Lane = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef Lane I __attribute__((vector_size(B)));
  static constexpr int64_t kWidth = B / sizeof(T);
};

// Lane integers of the row bounds ("visible" counts) kernels compare against.
template <typename T>
using LaneInt = typename Simd<T, 16>::Lane;

// Buffers pad the head dimension to a multiple of the widest vector (64 bytes).
template <typename T>
constexpr int64_t kPadWidth = 64 / sizeof(T);

template <typename V>
GLM_EXT_ALWAYS_INLINE V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V>
GLM_EXT_ALWAYS_INLINE void store(void* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// mask ? a : b, lane by lane (mask lanes all ones or all zeros, as comparisons give).
template <typename V, typename I>
GLM_EXT_ALWAYS_INLINE V select(I mask, V a, V b) {
  return (V)(((I)a & mask) | ((I)b & ~mask));
}

template <typename V>
GLM_EXT_ALWAYS_INLINE V vmax(V a, V b) {
  return select(a > b, a, b);
}

template <typename T, int B>
GLM_EXT_ALWAYS_INLINE typename Simd<T, B>::I lane_index() {
  typename Simd<T, B>::I lanes;
  for (int64_t l = 0; l < Simd<T, B>::kWidth; ++l) lanes[l] = static_cast<typename Simd<T, B>::Lane>(l);
  return lanes;
}

// Horizontal reductions by halving (log2(width) steps).
template <typename T, int B>
GLM_EXT_ALWAYS_INLINE T horizontal_max(typename Simd<T, B>::V v) {
  if constexpr (B == sizeof(T)) {
    return v[0];
  } else {
    typename Simd<T, B / 2>::V lo, hi;
    std::memcpy(&lo, &v, B / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + B / 2, B / 2);
    return horizontal_max<T, B / 2>(vmax(lo, hi));
  }
}

template <typename T, int B>
GLM_EXT_ALWAYS_INLINE T horizontal_sum(typename Simd<T, B>::V v) {
  if constexpr (B == sizeof(T)) {
    return v[0];
  } else {
    typename Simd<T, B / 2>::V lo, hi;
    std::memcpy(&lo, &v, B / 2);
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + B / 2, B / 2);
    return horizontal_sum<T, B / 2>(lo + hi);
  }
}

// exp of every lane. float: Cephes' expf (range reduction by ln 2 in two parts, degree-6
// polynomial, 2^n through the exponent bits), about 1 ulp; arguments below -87 give 0 (exact
// results there are below 2^-125, negligible against a softmax sum of at least 1). double: libm.
template <typename T, int B>
GLM_EXT_ALWAYS_INLINE typename Simd<T, B>::V exp_lanes(typename Simd<T, B>::V x) {
  using V = typename Simd<T, B>::V;
  using I = typename Simd<T, B>::I;
  if constexpr (std::is_same_v<T, float>) {
    const I underflow = x < -87.0f;
    x = select(underflow, V{} - 87.0f, x);
    x = select(x > 88.0f, V{} + 88.0f, x);
    const V n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest
    V r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    V y = V{} + 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    const I bits = (__builtin_convertvector(n, I) + 127) << 23;
    return select(underflow, V{}, y * (V)bits);
  } else {
    for (int64_t l = 0; l < Simd<T, B>::kWidth; ++l) x[l] = std::exp(x[l]);
    return x;
  }
}

// The register block of the tile products: c[R, NV * W] (+)= a[R, kd] @ b[kd, NV * W], the R x NV
// accumulators held in registers, b read once per j for all R rows. kTransA: a is stored
// transposed (element (r, j) at a[j * lda + r]).
template <typename T, int B, int R, int NV, bool kAccumulate, bool kTransA>
GLM_EXT_ALWAYS_INLINE void gemm_block(const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                                      int64_t ldc, int64_t kd) {
  using V = typename Simd<T, B>::V;
  constexpr int64_t W = Simd<T, B>::kWidth;
  V acc[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int u = 0; u < NV; ++u) acc[r][u] = kAccumulate ? load<V>(c + r * ldc + u * W) : V{};
  }
  for (int64_t j = 0; j < kd; ++j) {
    V bv[NV];
#pragma GCC unroll 16
    for (int u = 0; u < NV; ++u) bv[u] = load<V>(b + j * ldb + u * W);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const T x = kTransA ? a[j * lda + r] : a[r * lda + j];
#pragma GCC unroll 16
      for (int u = 0; u < NV; ++u) acc[r][u] += x * bv[u];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 16
    for (int u = 0; u < NV; ++u) store(c + r * ldc + u * W, acc[r][u]);
  }
}

// c[m, n] (+)= a[m, kd] @ b[kd, n] (a^T[m, kd] @ b with kTransA), n a multiple of the vector width
// W. Column panels of b (kd x NV * W) stay in L1 while the rows of a stream past.
template <typename T, int B, int R, int NV, bool kAccumulate, bool kTransA>
GLM_EXT_ALWAYS_INLINE void gemm_impl(const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                                     int64_t ldc, int64_t m, int64_t kd, int64_t n) {
  constexpr int64_t W = Simd<T, B>::kWidth;
  const int64_t row_step = kTransA ? 1 : lda;
  int64_t col = 0;
  for (; col + NV * W <= n; col += NV * W) {
    int64_t i = 0;
    for (; i + R <= m; i += R) {
      gemm_block<T, B, R, NV, kAccumulate, kTransA>(a + i * row_step, lda, b + col, ldb, c + i * ldc + col,
                                                    ldc, kd);
    }
    for (; i < m; ++i) {
      gemm_block<T, B, 1, NV, kAccumulate, kTransA>(a + i * row_step, lda, b + col, ldb, c + i * ldc + col,
                                                    ldc, kd);
    }
  }
  for (; col < n; col += W) {
    int64_t i = 0;
    for (; i + R <= m; i += R) {
      gemm_block<T, B, R, 1, kAccumulate, kTransA>(a + i * row_step, lda, b + col, ldb, c + i * ldc + col,
                                                   ldc, kd);
    }
    for (; i < m; ++i) {
      gemm_block<T, B, 1, 1, kAccumulate, kTransA>(a + i * row_step, lda, b + col, ldb, c + i * ldc + col,
                                                   ldc, kd);
    }
  }
}

// Online softmax over one score tile s [rows, kTile] of key tile k0 (flash-attention 2): row i
// sees columns j < visible[i] - k0. Turns s into the unnormalised probabilities exp(s * scale -
// max), updates the running max and sum and rescales the output accumulator rows (ld = dp).
template <typename T, int B>
GLM_EXT_ALWAYS_INLINE void softmax_tile_impl(T* s, int64_t rows, int64_t k0,
                                             const LaneInt<T>* visible, T scale, T* row_max,
                                             T* row_sum, T* acc, int64_t dp) {
  using V = typename Simd<T, B>::V;
  using Lane = typename Simd<T, B>::Lane;
  constexpr int64_t W = Simd<T, B>::kWidth, NV = kTile / W;
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const auto lanes = lane_index<T, B>();
  for (int64_t i = 0; i < rows; ++i) {
    T* srow = s + i * kTile;
    const Lane count = static_cast<Lane>(visible[i] - k0);
    if (count <= 0) {  // this row sees nothing here (rows of a block need not see the same keys)
      std::memset(srow, 0, kTile * sizeof(T));
      continue;
    }
    V x[NV];
    V top = V{} + kNegInf;
#pragma GCC unroll 16
    for (int64_t u = 0; u < NV; ++u) {
      x[u] = select(lanes + static_cast<Lane>(u * W) < count, load<V>(srow + u * W) * scale,
                    V{} + kNegInf);
      top = vmax(x[u], top);
    }
    const T new_max = std::max(row_max[i], horizontal_max<T, B>(top));
    const T alpha = std::exp(row_max[i] - new_max);  // 0 on the row's first tile (max was -inf)
    V sum = {};
#pragma GCC unroll 16
    for (int64_t u = 0; u < NV; ++u) {
      const V p = exp_lanes<T, B>(x[u] - new_max);  // masked lanes: exp(-inf) = 0
      store(srow + u * W, p);
      sum += p;
    }
    row_sum[i] = row_sum[i] * alpha + horizontal_sum<T, B>(sum);
    row_max[i] = new_max;
    if (alpha != T(1)) {
      T* arow = acc + i * dp;
      for (int64_t d = 0; d < dp; d += W) store(arow + d, load<V>(arow + d) * alpha);
    }
  }
}

// Backward, query rows in rows (dQ pass): s [rows, kTile] scores, dp [rows, kTile] = grad_out @
// v^T. Writes dS = P * (dP - delta) into dp, with P = exp(s * scale - lse) on visible columns.
template <typename T, int B>
GLM_EXT_ALWAYS_INLINE void grad_scores_rows_impl(const T* s, T* dp, int64_t rows, int64_t k0,
                                                 const LaneInt<T>* visible, const T* lse,
                                                 const T* delta, T scale) {
  using V = typename Simd<T, B>::V;
  using Lane = typename Simd<T, B>::Lane;
  constexpr int64_t W = Simd<T, B>::kWidth, NV = kTile / W;
  const auto lanes = lane_index<T, B>();
  for (int64_t i = 0; i < rows; ++i) {
    const Lane count = static_cast<Lane>(visible[i] - k0);
    T* dprow = dp + i * kTile;
    const T* srow = s + i * kTile;
#pragma GCC unroll 16
    for (int64_t u = 0; u < NV; ++u) {
      const V p = select(lanes + static_cast<Lane>(u * W) < count,
                         exp_lanes<T, B>(load<V>(srow + u * W) * scale - lse[i]), V{});
      store(dprow + u * W, p * (load<V>(dprow + u * W) - delta[i]));
    }
  }
}

// Backward, key rows in rows (dK/dV pass): st [keys, kTile] transposed scores (column i = query
// i of the block), dpt = v @ grad_out^T likewise. Writes P^T into st and dS^T into dpt.
template <typename T, int B>
GLM_EXT_ALWAYS_INLINE void grad_scores_columns_impl(T* st, T* dpt, int64_t keys, int64_t k0,
                                                    const LaneInt<T>* visible, const T* lse,
                                                    const T* delta, T scale) {
  using V = typename Simd<T, B>::V;
  using I = typename Simd<T, B>::I;
  using Lane = typename Simd<T, B>::Lane;
  constexpr int64_t W = Simd<T, B>::kWidth, NV = kTile / W;
  for (int64_t j = 0; j < keys; ++j) {
    const Lane key = static_cast<Lane>(k0 + j);
    T* strow = st + j * kTile;
    T* dprow = dpt + j * kTile;
#pragma GCC unroll 16
    for (int64_t u = 0; u < NV; ++u) {
      const V p = select(load<I>(visible + u * W) > key,
                         exp_lanes<T, B>(load<V>(strow + u * W) * scale - load<V>(lse + u * W)), V{});
      store(strow + u * W, p);
      store(dprow + u * W, p * (load<V>(dprow + u * W) - load<V>(delta + u * W)));
    }
  }
}

// The tile kernels of one instruction set, picked once at run time (see tile_kernels).
template <typename T>
struct TileKernels {
  const char* isa;
  // c = a @ b (gemm_set) or c += a @ b (gemm_add); a [m, kd], b [kd, n], n a multiple of 64 bytes.
  void (*gemm_set)(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t m,
                   int64_t kd, int64_t n);
  void (*gemm_add)(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t m,
                   int64_t kd, int64_t n);
  // c += a^T @ b, a stored [kd, m] (leading dimension lda).
  void (*gemm_add_ta)(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t m,
                      int64_t kd, int64_t n);
  void (*softmax_tile)(T* s, int64_t rows, int64_t k0, const LaneInt<T>* visible, T scale,
                       T* row_max, T* row_sum, T* acc, int64_t dp);
  void (*grad_scores_rows)(const T* s, T* dp, int64_t rows, int64_t k0, const LaneInt<T>* visible,
                           const T* lse, const T* delta, T scale);
  void (*grad_scores_columns)(T* st, T* dpt, int64_t keys, int64_t k0, const LaneInt<T>* visible,
                              const T* lse, const T* delta, T scale);
};

// One instruction set: vector bytes, register block rows x vectors, function attributes.
#define GLM_EXT_DEFINE_TILE_KERNELS(NAME, ATTRIBUTES, BYTES, ROWS, VECS)                              \
  template <typename T>                                                                              \
  ATTRIBUTES void NAME##_gemm_set(const T* a, int64_t lda, const T* b, int64_t ldb, T* c,            \
                                  int64_t ldc, int64_t m, int64_t kd, int64_t n) {                   \
    gemm_impl<T, BYTES, ROWS, VECS, false, false>(a, lda, b, ldb, c, ldc, m, kd, n);                  \
  }                                                                                                  \
  template <typename T>                                                                              \
  ATTRIBUTES void NAME##_gemm_add(const T* a, int64_t lda, const T* b, int64_t ldb, T* c,            \
                                  int64_t ldc, int64_t m, int64_t kd, int64_t n) {                   \
    gemm_impl<T, BYTES, ROWS, VECS, true, false>(a, lda, b, ldb, c, ldc, m, kd, n);                   \
  }                                                                                                  \
  template <typename T>                                                                              \
  ATTRIBUTES void NAME##_gemm_add_ta(const T* a, int64_t lda, const T* b, int64_t ldb, T* c,         \
                                     int64_t ldc, int64_t m, int64_t kd, int64_t n) {                \
    gemm_impl<T, BYTES, ROWS, VECS, true, true>(a, lda, b, ldb, c, ldc, m, kd, n);                    \
  }                                                                                                  \
  template <typename T>                                                                              \
  ATTRIBUTES void NAME##_softmax_tile(T* s, int64_t rows, int64_t k0, const LaneInt<T>* visible,     \
                                      T scale, T* row_max, T* row_sum, T* acc, int64_t dp) {         \
    softmax_tile_impl<T, BYTES>(s, rows, k0, visible, scale, row_max, row_sum, acc, dp);             \
  }                                                                                                  \
  template <typename T>                                                                              \
  ATTRIBUTES void NAME##_grad_scores_rows(const T* s, T* dp, int64_t rows, int64_t k0,               \
                                          const LaneInt<T>* visible, const T* lse, const T* delta,   \
                                          T scale) {                                                 \
    grad_scores_rows_impl<T, BYTES>(s, dp, rows, k0, visible, lse, delta, scale);                    \
  }                                                                                                  \
  template <typename T>                                                                              \
  ATTRIBUTES void NAME##_grad_scores_columns(T* st, T* dpt, int64_t keys, int64_t k0,                \
                                             const LaneInt<T>* visible, const T* lse,                \
                                             const T* delta, T scale) {                              \
    grad_scores_columns_impl<T, BYTES>(st, dpt, keys, k0, visible, lse, delta, scale);               \
  }                                                                                                  \
  template <typename T>                                                                              \
  TileKernels<T> NAME##_kernels() {                                                                  \
    return {#NAME, &NAME##_gemm_set<T>, &NAME##_gemm_add<T>, &NAME##_gemm_add_ta<T>,                 \
            &NAME##_softmax_tile<T>,                                                                 \
            &NAME##_grad_scores_rows<T>, &NAME##_grad_scores_columns<T>};                            \
  }

// Baseline: 16-byte vectors (SSE2 on x86-64, NEON on arm64), 4 rows x 2 vectors.
GLM_EXT_DEFINE_TILE_KERNELS(baseline, , 16, 4, 2)
#if GLM_EXT_X86_KERNELS
// 16 ymm registers: 4 rows x 2 vectors of accumulators; 32 zmm registers: 4 rows x 4 vectors.
GLM_EXT_DEFINE_TILE_KERNELS(avx2, GLM_EXT_AVX2, 32, 4, 2)
GLM_EXT_DEFINE_TILE_KERNELS(avx512, GLM_EXT_AVX512, 64, 4, 4)
#endif
#undef GLM_EXT_DEFINE_TILE_KERNELS

// The widest instruction set both ATen and this CPU allow (ATen's choice honours the
// ATEN_CPU_CAPABILITY environment variable, so tests can force the narrower paths).
template <typename T>
const TileKernels<T>& tile_kernels() {
  static const TileKernels<T> kernels = [] {
#if GLM_EXT_X86_KERNELS
    const std::string capability = at::get_cpu_capability();
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (capability == "AVX512" && avx2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq")) {
      return avx512_kernels<T>();
    }
    if ((capability == "AVX512" || capability == "AVX2") && avx2) return avx2_kernels<T>();
#endif
    return baseline_kernels<T>();
  }();
  return kernels;
}

// ---------------------------------------------------------------------------------------------
// Tile loads: rows of one head of q/k/v/grad_out (any row stride, contiguous head dimension),
// converted to the accumulation type. Padding columns [dim, dp) of the buffers stay zero.

// dst[r, d] = src[r * stride + d] for r < rows, d < dim (dst has leading dimension ld).
template <typename T, typename scalar_t>
void load_rows(const scalar_t* src, int64_t stride, int64_t rows, int64_t dim, T* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * stride;
    T* d = dst + r * ld;
    for (int64_t c = 0; c < dim; ++c) d[c] = static_cast<T>(s[c]);
  }
}

// dst[d, r] = src[r * stride + d] (dst is [dim, kTile]); columns r in [rows, kTile) are zeroed.
template <typename T, typename scalar_t>
void load_transposed(const scalar_t* src, int64_t stride, int64_t rows, int64_t dim, T* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * stride;
    for (int64_t c = 0; c < dim; ++c) dst[c * kTile + r] = static_cast<T>(s[c]);
  }
  if (rows < kTile) {
    for (int64_t c = 0; c < dim; ++c) std::fill(dst + c * kTile + rows, dst + (c + 1) * kTile, T(0));
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
int64_t padded_head_dim(int64_t head_dim) {
  return ceil_div(head_dim, kPadWidth<T>) * kPadWidth<T>;
}

// One head of one sample of q, k, v or grad_out in the accumulation type, converted once and
// reused by the consecutive work items of a thread that read the same head: its rows [len, dp]
// and/or its kTile-row tiles transposed, [tiles, dp, kTile]. Linear in the sequence length.
template <typename T>
class HeadCopy {
 public:
  HeadCopy(int64_t dim, bool rows, bool transposed)
      : dim_(dim), dp_(padded_head_dim<T>(dim)), want_rows_(rows), want_transposed_(transposed) {}

  template <typename scalar_t>
  void load(int64_t sample, int64_t head, const scalar_t* src, int64_t stride, int64_t len) {
    if (sample == sample_ && head == head_) return;
    sample_ = sample;
    head_ = head;
    if (want_rows_) {
      rows_.assign(len * dp_, T(0));
      load_rows(src, stride, len, dim_, rows_.data(), dp_);
    }
    if (want_transposed_) {
      const int64_t tiles = ceil_div(len, kTile);
      transposed_.assign(tiles * dp_ * kTile, T(0));
      for (int64_t t = 0; t < tiles; ++t) {
        load_transposed(src + t * kTile * stride, stride, std::min(kTile, len - t * kTile), dim_,
                        transposed_.data() + t * dp_ * kTile);
      }
    }
  }
  const T* row(int64_t r) const { return rows_.data() + r * dp_; }           // [.., dp]
  const T* tile(int64_t r) const { return transposed_.data() + r * dp_; }   // r = tile * kTile

 private:
  int64_t dim_, dp_;
  bool want_rows_, want_transposed_;
  int64_t sample_ = -1, head_ = -1;
  std::vector<T> rows_, transposed_;
};

// Keys [0, visible) seen by query `row` of a sample (GLM_SPEC 2: j < sep or j <= position).
int64_t visible_keys(const MixedMaskSample& s, int64_t row) {
  return std::min(s.len_k, std::max(s.sep, s.len_k - s.len_q + row + 1));
}

// Products over the keys (P V, dS K) and over the queries (P^T dO, dS^T Q) of a tile skip the
// masked pairs instead of multiplying them by their zero probability: 0 * NaN is NaN, so a NaN or
// infinity in a key or value row (or a query row) would otherwise reach rows that never see it.
// Query i of a block sees the keys [0, visible[i]), and visible grows with i, so every row of a
// tile sees a prefix of its keys and every key is seen by a suffix of its queries: the rows that
// see everything go through one blocked product, the others (the tiles on the diagonal) row by row.

// c[i] += a[i, :n_i] @ b[:n_i] for the query rows i < rows of a tile, n_i = min(visible[i] - k0,
// cols). Row i of a starts at a + i * row_step: row_step = lda with gemm_add (a is [rows, kTile]),
// 1 with gemm_add_ta (a is stored transposed, [keys, kTile]).
template <typename T, typename Gemm>
void add_product_over_visible_keys(Gemm gemm, const T* a, int64_t lda, int64_t row_step, const T* b, T* c,
                                   int64_t dp, int64_t rows, int64_t k0, int64_t cols,
                                   const LaneInt<T>* visible) {
  int64_t partial = rows;  // rows [partial, rows) see every key of the tile
  while (partial > 0 && visible[partial - 1] - k0 >= cols) --partial;
  if (partial < rows) gemm(a + partial * row_step, lda, b, dp, c + partial * dp, dp, rows - partial, cols, dp);
  for (int64_t i = 0; i < partial; ++i) {
    const int64_t seen = visible[i] - k0;
    if (seen > 0) gemm(a + i * row_step, lda, b, dp, c + i * dp, dp, 1, seen, dp);
  }
}

// c[j] += a[j, f_j:rows] @ b[f_j:rows] for the keys j < keys of a tile (a [keys, kTile], b the
// block's query rows), f_j the first of the block's queries that sees key k0 + j.
template <typename T, typename Gemm>
void add_product_over_seeing_queries(Gemm gemm, const T* a, const T* b, T* c, int64_t dp, int64_t keys,
                                     int64_t rows, int64_t k0, const LaneInt<T>* visible) {
  int64_t everyone = 0;  // keys [0, everyone) are seen by every query of the block
  while (everyone < keys && rows > 0 && visible[0] > k0 + everyone) ++everyone;
  if (everyone > 0) gemm(a, kTile, b, dp, c, dp, everyone, rows, dp);
  for (int64_t j = everyone, first = 0; j < keys; ++j) {
    while (first < rows && visible[first] <= k0 + j) ++first;
    if (first < rows) gemm(a + j * kTile + first, kTile, b + first * dp, dp, c + j * dp, dp, 1, rows - first, dp);
  }
}

// Work items of a pass: for each sample, `heads` heads times ceil(len / kTile) blocks of its
// queries (or keys), numbered sample-major, then head, then block, so that the consecutive items
// of a thread share their key/value (or query) head.
class WorkItems {
 public:
  WorkItems(const std::vector<MixedMaskSample>& samples, int64_t heads, bool over_keys)
      : first_(samples.size() + 1, 0), blocks_(samples.size()) {
    for (size_t s = 0; s < samples.size(); ++s) {
      blocks_[s] = ceil_div(over_keys ? samples[s].len_k : samples[s].len_q, kTile);
      first_[s + 1] = first_[s] + heads * blocks_[s];
    }
  }
  int64_t size() const { return first_.back(); }
  // (sample, head, block) of item `index`.
  void locate(int64_t index, int64_t& sample, int64_t& head, int64_t& block) const {
    sample = std::upper_bound(first_.begin(), first_.end(), index) - first_.begin() - 1;
    const int64_t local = index - first_[sample];
    head = local / blocks_[sample];
    block = local % blocks_[sample];
  }

 private:
  std::vector<int64_t> first_, blocks_;
};

// Multiply-adds of one pass over every (query, key) pair, an upper bound of its work.
int64_t attention_work(const MixedMaskAttentionArgs& a, const std::vector<MixedMaskSample>& samples) {
  int64_t pairs = 0;
  for (const auto& s : samples) pairs += s.len_q * s.len_k;
  return pairs * a.heads_q * a.head_dim;
}

// The grain of a parallel pass over `items`: all of them on one thread when the pass is small
// (decoding one token, tiny test shapes), where starting threads and their barrier would cost
// more than the work; otherwise one item.
int64_t grain_size(int64_t items, int64_t work) {
  constexpr int64_t kMinParallelWork = int64_t{1} << 20;
  return work < kMinParallelWork ? std::max<int64_t>(items, 1) : 1;
}

// ---------------------------------------------------------------------------------------------
// Forward

// Converts key/value head kv_head of sample si (a no-op when the copies already hold it).
template <typename T, typename scalar_t>
void load_kv_head(const MixedMaskAttentionArgs& a, const MixedMaskSample& s, int64_t si,
                  int64_t kv_head, const scalar_t* k, const scalar_t* v, HeadCopy<T>& k_copy,
                  HeadCopy<T>& v_copy) {
  k_copy.load(si, kv_head, k + attention_offset(a.k_strides, s, s.k_start, 0, kv_head),
              a.k_strides.token, s.len_k);
  v_copy.load(si, kv_head, v + attention_offset(a.v_strides, s, s.k_start, 0, kv_head),
              a.v_strides.token, s.len_k);
}

template <typename scalar_t>
void forward_kernel(const MixedMaskAttentionArgs& a, const std::vector<MixedMaskSample>& samples,
                    at::Tensor& out, at::Tensor& lse) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const TileKernels<T>& kernels = tile_kernels<T>();
  const int64_t dim = a.head_dim, dp = padded_head_dim<T>(dim);
  const int64_t group = a.heads_q / a.heads_kv;
  const T scale = static_cast<T>(a.softmax_scale);
  const scalar_t* q = a.q.const_data_ptr<scalar_t>();
  const scalar_t* k = a.k.const_data_ptr<scalar_t>();
  const scalar_t* v = a.v.const_data_ptr<scalar_t>();
  scalar_t* o = out.mutable_data_ptr<scalar_t>();
  T* lse_ptr = lse.mutable_data_ptr<T>();
  const TokenStrides o_strides = token_strides(out), l_strides = a.lse_strides();
  const WorkItems items(samples, a.heads_q, /*over_keys=*/false);

  const int64_t grain = grain_size(items.size(), attention_work(a, samples));
  at::parallel_for(0, items.size(), grain, [&](int64_t begin, int64_t end) {
    HeadCopy<T> k_copy(dim, /*rows=*/false, /*transposed=*/true), v_copy(dim, true, false);
    std::vector<T> buffer(2 * kTile * dp + kTile * kTile, T(0));
    T* qbuf = buffer.data();        // [kTile, dp]
    T* acc = qbuf + kTile * dp;     // [kTile, dp]
    T* scores = acc + kTile * dp;   // [kTile, kTile]
    T row_max[kTile], row_sum[kTile];
    LaneInt<T> visible[kTile];
    for (int64_t index = begin; index < end; ++index) {
      int64_t si, h, block;
      items.locate(index, si, h, block);
      const MixedMaskSample& s = samples[si];
      const int64_t kv_head = h / group, q0 = block * kTile;
      const int64_t rows = std::min(kTile, s.len_q - q0);
      load_kv_head(a, s, si, kv_head, k, v, k_copy, v_copy);
      load_rows(q + attention_offset(a.q_strides, s, s.q_start, q0, h), a.q_strides.token, rows, dim,
                qbuf, dp);
      for (int64_t i = 0; i < rows; ++i) {
        visible[i] = static_cast<LaneInt<T>>(visible_keys(s, q0 + i));
        row_max[i] = -std::numeric_limits<T>::infinity();
        row_sum[i] = 0;
      }
      std::fill(acc, acc + rows * dp, T(0));
      const int64_t key_end = visible[rows - 1];  // `visible` grows with the row
      for (int64_t k0 = 0; k0 < key_end; k0 += kTile) {  // tiles at or past key_end: all masked
        const int64_t cols = std::min(kTile, s.len_k - k0);
        kernels.gemm_set(qbuf, dp, k_copy.tile(k0), kTile, scores, kTile, rows, dp, kTile);
        kernels.softmax_tile(scores, rows, k0, visible, scale, row_max, row_sum, acc, dp);
        add_product_over_visible_keys(kernels.gemm_add, scores, kTile, kTile, v_copy.row(k0), acc, dp, rows, k0,
                                      cols, visible);
      }
      scalar_t* o_rows = o + attention_offset(o_strides, s, s.q_start, q0, h);
      T* l_rows = lse_ptr + attention_offset(l_strides, s, s.q_start, q0, h);
      for (int64_t i = 0; i < rows; ++i) {
        const T inv = T(1) / row_sum[i];  // every row sees key 0 at least: row_sum >= 1
        for (int64_t d = 0; d < dim; ++d) {
          o_rows[i * o_strides.token + d] = static_cast<scalar_t>(acc[i * dp + d] * inv);
        }
        l_rows[i] = row_max[i] + std::log(row_sum[i]);
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

// ---------------------------------------------------------------------------------------------
// Backward

template <typename scalar_t>
void backward_kernel(const MixedMaskAttentionBackwardArgs& b,
                     const std::vector<MixedMaskSample>& samples, at::Tensor& grad_q,
                     at::Tensor& grad_k, at::Tensor& grad_v) {
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const TileKernels<T>& kernels = tile_kernels<T>();
  const MixedMaskAttentionArgs& a = b.forward;
  const int64_t dim = a.head_dim, dp = padded_head_dim<T>(dim);
  const int64_t group = a.heads_q / a.heads_kv;
  const T scale = static_cast<T>(a.softmax_scale);
  const scalar_t* q = a.q.const_data_ptr<scalar_t>();
  const scalar_t* k = a.k.const_data_ptr<scalar_t>();
  const scalar_t* v = a.v.const_data_ptr<scalar_t>();
  const scalar_t* go = b.grad_out.const_data_ptr<scalar_t>();
  const scalar_t* o = b.out.const_data_ptr<scalar_t>();
  const T* lse = b.lse.const_data_ptr<T>();
  const T* grad_lse = b.grad_lse.defined() ? b.grad_lse.const_data_ptr<T>() : nullptr;
  const TokenStrides stat_strides = a.lse_strides();
  const TokenStrides gq_strides = token_strides(grad_q);
  const TokenStrides gk_strides = token_strides(grad_k);  // grad_v: the same
  scalar_t* gq = grad_q.mutable_data_ptr<scalar_t>();
  scalar_t* gk = grad_k.mutable_data_ptr<scalar_t>();
  scalar_t* gv = grad_v.mutable_data_ptr<scalar_t>();
  const WorkItems query_items(samples, a.heads_q, /*over_keys=*/false);
  const WorkItems key_items(samples, a.heads_kv, /*over_keys=*/true);
  const int64_t work = attention_work(a, samples);

  // delta = rowsum(grad_out * out) - grad_lse, laid out like lse.
  auto delta_tensor = at::empty(a.lse_shape(), b.lse.options());
  T* delta = delta_tensor.mutable_data_ptr<T>();
  int64_t query_rows = 0;
  for (const auto& sample : samples) query_rows += sample.len_q;
  const int64_t delta_grain = grain_size(query_items.size(), query_rows * a.heads_q * dim);
  at::parallel_for(0, query_items.size(), delta_grain, [&](int64_t begin, int64_t end) {
    for (int64_t index = begin; index < end; ++index) {
      int64_t si, h, block;
      query_items.locate(index, si, h, block);
      const MixedMaskSample& s = samples[si];
      const int64_t q0 = block * kTile, rows = std::min(kTile, s.len_q - q0);
      for (int64_t i = q0; i < q0 + rows; ++i) {
        const scalar_t* g = go + attention_offset(b.grad_out_strides, s, s.q_start, i, h);
        const scalar_t* y = o + attention_offset(b.out_strides, s, s.q_start, i, h);
        T sum = 0;
        for (int64_t d = 0; d < dim; ++d) sum += static_cast<T>(g[d]) * static_cast<T>(y[d]);
        const int64_t at = attention_offset(stat_strides, s, s.q_start, i, h);
        delta[at] = grad_lse ? sum - grad_lse[at] : sum;
      }
    }
  });

  // Fused: one item per (sample, kv head), 5 tile products per tile. Every key block of the head,
  // every query head of its group; dK and dV in the item's float buffers, dQ of one query head at
  // a time in another. Used when there are at least as many items as threads.
  const int64_t head_pairs = static_cast<int64_t>(samples.size()) * a.heads_kv;
  if (head_pairs >= at::get_num_threads()) {
    at::parallel_for(0, head_pairs, grain_size(head_pairs, work), [&](int64_t begin, int64_t end) {
      HeadCopy<T> k_copy(dim, /*rows=*/true, /*transposed=*/false), v_copy(dim, true, false);
      HeadCopy<T> q_copy(dim, true, true), go_copy(dim, true, true);
      std::vector<T> dk, dv, dq;                       // [len_k, dp], [len_k, dp], [len_q, dp]
      std::vector<T> tiles(2 * kTile * kTile, T(0));
      T* st = tiles.data();         // [kTile, kTile]: scores, then probabilities, transposed
      T* dpt = st + kTile * kTile;  // [kTile, kTile]: dP, then dS, transposed
      alignas(64) T col_lse[kTile];
      alignas(64) T col_delta[kTile];
      alignas(64) LaneInt<T> col_visible[kTile];
      for (int64_t index = begin; index < end; ++index) {
        const int64_t si = index / a.heads_kv, kv_head = index % a.heads_kv;
        const MixedMaskSample& s = samples[si];
        load_kv_head(a, s, si, kv_head, k, v, k_copy, v_copy);
        dk.assign(s.len_k * dp, T(0));
        dv.assign(s.len_k * dp, T(0));
        for (int64_t h = kv_head * group; h < (kv_head + 1) * group; ++h) {
          q_copy.load(si, h, q + attention_offset(a.q_strides, s, s.q_start, 0, h), a.q_strides.token,
                      s.len_q);
          go_copy.load(si, h, go + attention_offset(b.grad_out_strides, s, s.q_start, 0, h),
                       b.grad_out_strides.token, s.len_q);
          dq.assign(s.len_q * dp, T(0));
          for (int64_t k0 = 0; k0 < s.len_k; k0 += kTile) {
            const int64_t keys = std::min(kTile, s.len_k - k0);
            const int64_t first_query = k0 < s.sep ? 0 : std::max<int64_t>(0, k0 - (s.len_k - s.len_q));
            for (int64_t q0 = first_query / kTile * kTile; q0 < s.len_q; q0 += kTile) {
              const int64_t rows = std::min(kTile, s.len_q - q0);
              const int64_t stat = attention_offset(stat_strides, s, s.q_start, q0, h);
              for (int64_t i = 0; i < kTile; ++i) {
                const bool real = i < rows;  // padding columns: masked (visible 0)
                col_visible[i] = real ? static_cast<LaneInt<T>>(visible_keys(s, q0 + i)) : 0;
                col_lse[i] = real ? lse[stat + i] : T(0);
                col_delta[i] = real ? delta[stat + i] : T(0);
              }
              const T* k_rows = k_copy.row(k0);
              kernels.gemm_set(k_rows, dp, q_copy.tile(q0), kTile, st, kTile, keys, dp, kTile);          // K Q^T
              kernels.gemm_set(v_copy.row(k0), dp, go_copy.tile(q0), kTile, dpt, kTile, keys, dp, kTile);  // V dO^T
              kernels.grad_scores_columns(st, dpt, keys, k0, col_visible, col_lse, col_delta, scale);
              add_product_over_seeing_queries(kernels.gemm_add, st, go_copy.row(q0), dv.data() + k0 * dp, dp, keys,
                                              rows, k0, col_visible);  // P^T dO
              add_product_over_seeing_queries(kernels.gemm_add, dpt, q_copy.row(q0), dk.data() + k0 * dp, dp, keys,
                                              rows, k0, col_visible);  // dS^T Q
              add_product_over_visible_keys(kernels.gemm_add_ta, dpt, kTile, 1, k_rows, dq.data() + q0 * dp, dp,
                                            rows, k0, keys, col_visible);  // dS K
            }
          }
          scalar_t* gq_rows = gq + attention_offset(gq_strides, s, s.q_start, 0, h);
          for (int64_t i = 0; i < s.len_q; ++i) {
            for (int64_t d = 0; d < dim; ++d) {
              gq_rows[i * gq_strides.token + d] = static_cast<scalar_t>(dq[i * dp + d] * scale);
            }
          }
        }
        scalar_t* gk_rows = gk + attention_offset(gk_strides, s, s.k_start, 0, kv_head);
        scalar_t* gv_rows = gv + attention_offset(gk_strides, s, s.k_start, 0, kv_head);
        for (int64_t j = 0; j < s.len_k; ++j) {
          for (int64_t d = 0; d < dim; ++d) {
            gk_rows[j * gk_strides.token + d] = static_cast<scalar_t>(dk[j * dp + d] * scale);
            gv_rows[j * gk_strides.token + d] = static_cast<scalar_t>(dv[j * dp + d]);
          }
        }
      }
    });
    return;
  }

  // Otherwise two passes with more parallelism (7 tile products per tile).
  // Pass 1: dK and dV of one key block of one kv head, over every query that sees the block.
  const int64_t key_grain = grain_size(key_items.size(), work);
  at::parallel_for(0, key_items.size(), key_grain, [&](int64_t begin, int64_t end) {
    HeadCopy<T> q_copy(dim, /*rows=*/true, /*transposed=*/true), go_copy(dim, true, true);
    std::vector<T> buffer(4 * kTile * dp + 2 * kTile * kTile, T(0));
    T* kbuf = buffer.data();     // [kTile, dp]
    T* vbuf = kbuf + kTile * dp;  // [kTile, dp]
    T* dk = vbuf + kTile * dp;    // [kTile, dp]
    T* dv = dk + kTile * dp;      // [kTile, dp]
    T* st = dv + kTile * dp;      // [kTile, kTile]: scores, then probabilities, transposed
    T* dpt = st + kTile * kTile;  // [kTile, kTile]: dP, then dS, transposed
    alignas(64) T col_lse[kTile];
    alignas(64) T col_delta[kTile];
    alignas(64) LaneInt<T> col_visible[kTile];
    for (int64_t index = begin; index < end; ++index) {
      int64_t si, kv_head, block;
      key_items.locate(index, si, kv_head, block);
      const MixedMaskSample& s = samples[si];
      const int64_t k0 = block * kTile, keys = std::min(kTile, s.len_k - k0);
      load_rows(k + attention_offset(a.k_strides, s, s.k_start, k0, kv_head), a.k_strides.token, keys,
                dim, kbuf, dp);
      load_rows(v + attention_offset(a.v_strides, s, s.k_start, k0, kv_head), a.v_strides.token, keys,
                dim, vbuf, dp);
      std::fill(dk, dk + keys * dp, T(0));
      std::fill(dv, dv + keys * dp, T(0));
      // The first query that sees key k0: all of them when k0 is in Part A, else position >= k0.
      const int64_t first_query = k0 < s.sep ? 0 : std::max<int64_t>(0, k0 - (s.len_k - s.len_q));
      for (int64_t h = kv_head * group; h < (kv_head + 1) * group && first_query < s.len_q; ++h) {
        q_copy.load(si, h, q + attention_offset(a.q_strides, s, s.q_start, 0, h), a.q_strides.token,
                    s.len_q);
        go_copy.load(si, h, go + attention_offset(b.grad_out_strides, s, s.q_start, 0, h),
                     b.grad_out_strides.token, s.len_q);
        for (int64_t q0 = first_query / kTile * kTile; q0 < s.len_q; q0 += kTile) {
          const int64_t rows = std::min(kTile, s.len_q - q0);
          const int64_t stat = attention_offset(stat_strides, s, s.q_start, q0, h);
          for (int64_t i = 0; i < kTile; ++i) {
            const bool real = i < rows;  // padding columns: masked (visible 0)
            col_visible[i] = real ? static_cast<LaneInt<T>>(visible_keys(s, q0 + i)) : 0;
            col_lse[i] = real ? lse[stat + i] : T(0);
            col_delta[i] = real ? delta[stat + i] : T(0);
          }
          kernels.gemm_set(kbuf, dp, q_copy.tile(q0), kTile, st, kTile, keys, dp, kTile);    // K Q^T
          kernels.gemm_set(vbuf, dp, go_copy.tile(q0), kTile, dpt, kTile, keys, dp, kTile);  // V dO^T
          kernels.grad_scores_columns(st, dpt, keys, k0, col_visible, col_lse, col_delta, scale);
          add_product_over_seeing_queries(kernels.gemm_add, st, go_copy.row(q0), dv, dp, keys, rows, k0,
                                          col_visible);  // dV += P^T dO
          add_product_over_seeing_queries(kernels.gemm_add, dpt, q_copy.row(q0), dk, dp, keys, rows, k0,
                                          col_visible);  // dK += dS^T Q
        }
      }
      scalar_t* gk_rows = gk + attention_offset(gk_strides, s, s.k_start, k0, kv_head);
      scalar_t* gv_rows = gv + attention_offset(gk_strides, s, s.k_start, k0, kv_head);
      for (int64_t j = 0; j < keys; ++j) {
        for (int64_t d = 0; d < dim; ++d) {
          gk_rows[j * gk_strides.token + d] = static_cast<scalar_t>(dk[j * dp + d] * scale);
          gv_rows[j * gk_strides.token + d] = static_cast<scalar_t>(dv[j * dp + d]);
        }
      }
    }
  });

  // Pass 2: dQ of one query block of one query head.
  const int64_t query_grain = grain_size(query_items.size(), work);
  at::parallel_for(0, query_items.size(), query_grain, [&](int64_t begin, int64_t end) {
    HeadCopy<T> k_copy(dim, /*rows=*/true, /*transposed=*/true), v_copy(dim, false, true);
    std::vector<T> buffer(3 * kTile * dp + 2 * kTile * kTile, T(0));
    T* qbuf = buffer.data();            // [kTile, dp]
    T* gobuf = qbuf + kTile * dp;       // [kTile, dp]
    T* dq = gobuf + kTile * dp;         // [kTile, dp]
    T* scores = dq + kTile * dp;        // [kTile, kTile]
    T* dscores = scores + kTile * kTile;  // [kTile, kTile]: dP, then dS
    T row_lse[kTile], row_delta[kTile];
    LaneInt<T> visible[kTile];
    for (int64_t index = begin; index < end; ++index) {
      int64_t si, h, block;
      query_items.locate(index, si, h, block);
      const MixedMaskSample& s = samples[si];
      const int64_t kv_head = h / group, q0 = block * kTile;
      const int64_t rows = std::min(kTile, s.len_q - q0);
      load_kv_head(a, s, si, kv_head, k, v, k_copy, v_copy);
      load_rows(q + attention_offset(a.q_strides, s, s.q_start, q0, h), a.q_strides.token, rows, dim,
                qbuf, dp);
      load_rows(go + attention_offset(b.grad_out_strides, s, s.q_start, q0, h),
                b.grad_out_strides.token, rows, dim, gobuf, dp);
      const int64_t stat = attention_offset(stat_strides, s, s.q_start, q0, h);
      for (int64_t i = 0; i < rows; ++i) {
        visible[i] = static_cast<LaneInt<T>>(visible_keys(s, q0 + i));
        row_lse[i] = lse[stat + i];
        row_delta[i] = delta[stat + i];
      }
      std::fill(dq, dq + rows * dp, T(0));
      const int64_t key_end = visible[rows - 1];
      for (int64_t k0 = 0; k0 < key_end; k0 += kTile) {
        const int64_t cols = std::min(kTile, s.len_k - k0);
        kernels.gemm_set(qbuf, dp, k_copy.tile(k0), kTile, scores, kTile, rows, dp, kTile);     // Q K^T
        kernels.gemm_set(gobuf, dp, v_copy.tile(k0), kTile, dscores, kTile, rows, dp, kTile);  // dO V^T
        kernels.grad_scores_rows(scores, dscores, rows, k0, visible, row_lse, row_delta, scale);
        add_product_over_visible_keys(kernels.gemm_add, dscores, kTile, kTile, k_copy.row(k0), dq, dp, rows, k0,
                                      cols, visible);  // dQ += dS K
      }
      scalar_t* gq_rows = gq + attention_offset(gq_strides, s, s.q_start, q0, h);
      for (int64_t i = 0; i < rows; ++i) {
        for (int64_t d = 0; d < dim; ++d) {
          gq_rows[i * gq_strides.token + d] = static_cast<scalar_t>(dq[i * dp + d] * scale);
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

TORCH_LIBRARY_IMPL(glm_ext, CPU, m) {
  m.impl("mixed_mask_attention", &mixed_mask_attention_cpu);
  m.impl("mixed_mask_attention_backward", &mixed_mask_attention_backward_cpu);
}

}  // namespace glm_ext
