// The tile layer of the CPU attention kernels (see tile_kernels.h): SIMD helpers on GCC/Clang
// vector types, the register-blocked products and the softmax steps, instantiated once per
// instruction set through function target attributes.
#include "attention/cpu/tile_kernels.h"

#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "common/cpu_isa.h"

namespace glm_ext::attention_cpu {
namespace {

// ---------------------------------------------------------------------------------------------
// SIMD vectors of B bytes (GCC/Clang vector extensions) and the integer vector of the same lanes.

template <typename T, int B>
struct Simd {
  typedef T V __attribute__((vector_size(B)));
  typedef LaneInt<T> I __attribute__((vector_size(B)));
  static constexpr int64_t kWidth = B / sizeof(T);
};

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

// mask ? a : b, lane by lane (mask lanes all ones or all zeros, as comparisons give). Masks are
// applied to a computation's inputs, never to a result computed from other masks: GCC turns a
// select of a comparison-laden expression into scalar code.
template <typename V, typename I>
GLM_EXT_ALWAYS_INLINE V select(I mask, V a, V b) {
  return (V)(((I)a & mask) | ((I)b & ~mask));
}

// 2^x of every lane. float: x = n + f with n an integer and |f| <= 1/2, 2^f by a degree-5 minimax
// polynomial (relative error below 2e-7, that of float32 scores around 1), 2^n through the exponent
// bits; below -127 the result is 0 (masked lanes are -inf), NaN stays NaN. Callers pass x <= 8 up to
// rounding (scores minus their reference maximum or their log-sum-exp); above 128 the result is
// undefined.
// double: libm.
template <typename T, int B>
GLM_EXT_ALWAYS_INLINE typename Simd<T, B>::V exp2_lanes(typename Simd<T, B>::V x) {
  using V = typename Simd<T, B>::V;
  using I = typename Simd<T, B>::I;
  if constexpr (std::is_same_v<T, float>) {
    x = select(x < -127.0f, V{} - 127.0f, x);
    const V shifted = x + 12583039.0f;  // 1.5 * 2^23 + 127: n + 127 lands in the low mantissa bits
    const V n = shifted - 12583039.0f;
    const V f = x - n;
    V p = V{} + 1.3264727213731118e-3f;
    p = p * f + 9.671512812494442e-3f;
    p = p * f + 5.550733744824626e-2f;
    p = p * f + 2.4022242082677425e-1f;
    p = p * f + 6.931469775973309e-1f;
    p = p * f + 1.0f;
    const I bits = (I)shifted << 23;  // the exponent field n + 127 (the high bits shift out); 0 at -127
    return p * (V)bits;
  } else {
    for (int64_t l = 0; l < Simd<T, B>::kWidth; ++l) x[l] = std::exp2(x[l]);
    return x;
  }
}

// ---------------------------------------------------------------------------------------------
// Products

// The register block: c[R, NV * W] (+)= a[R, kd] @ b[kd, NV * W], the R x NV accumulators held in
// registers, b read once per j for all R rows. kTransA: element (r, j) of a is a[j * lda + r].
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

// One column panel (NV vectors wide) of c over its m rows: blocks of R rows, then of 4 (the rest of
// a 64-row tile when R is 6 or 12), then single rows.
template <typename T, int B, int R, int NV, bool kAccumulate, bool kTransA>
GLM_EXT_ALWAYS_INLINE void gemm_panel(const T* a, int64_t lda, const T* b, int64_t ldb, T* c, int64_t ldc,
                                      int64_t m, int64_t kd) {
  const int64_t row_step = kTransA ? 1 : lda;
  int64_t i = 0;
  for (; i + R <= m; i += R) {
    gemm_block<T, B, R, NV, kAccumulate, kTransA>(a + i * row_step, lda, b, ldb, c + i * ldc, ldc, kd);
  }
  if constexpr (R > 4) {
    for (; i + 4 <= m; i += 4) {
      gemm_block<T, B, 4, NV, kAccumulate, kTransA>(a + i * row_step, lda, b, ldb, c + i * ldc, ldc, kd);
    }
  }
  for (; i < m; ++i) {
    gemm_block<T, B, 1, NV, kAccumulate, kTransA>(a + i * row_step, lda, b, ldb, c + i * ldc, ldc, kd);
  }
}

// c[m, n] (+)= a[m, kd] @ b[kd, n] (a^T @ b with kTransA), n a multiple of W. Column panels of b
// (kd x NV * W) stay in L1 while the rows of a stream past.
template <typename T, int B, int R, int NV, bool kAccumulate, bool kTransA>
GLM_EXT_ALWAYS_INLINE void gemm_impl(const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                                     int64_t ldc, int64_t m, int64_t kd, int64_t n) {
  constexpr int64_t W = Simd<T, B>::kWidth;
  int64_t col = 0;
  for (; col + NV * W <= n; col += NV * W) {
    gemm_panel<T, B, R, NV, kAccumulate, kTransA>(a, lda, b + col, ldb, c + col, ldc, m, kd);
  }
  if constexpr (NV >= 4) {  // half panels (n = 32 floats with 64-byte vectors)
    for (; col + NV / 2 * W <= n; col += NV / 2 * W) {
      gemm_panel<T, B, 2 * R, NV / 2, kAccumulate, kTransA>(a, lda, b + col, ldb, c + col, ldc, m, kd);
    }
  }
  for (; col < n; col += W) {
    gemm_panel<T, B, R, 1, kAccumulate, kTransA>(a, lda, b + col, ldb, c + col, ldc, m, kd);
  }
}

// ---------------------------------------------------------------------------------------------
// Softmax steps (see TileKernels). The kTile query lanes of a row are NV vectors.

// The running maximum of a query moves only when a tile's scores pass it by more than this (log2
// units): probabilities are then at most 2^8, far from overflow, and in most tiles the output
// accumulator keeps its scale (alpha is exactly 1, and scale_rows skips the row).
template <typename T>
constexpr T kMaxSlack = 8;

template <typename T, int B>
GLM_EXT_ALWAYS_INLINE void softmax_columns_impl(T* st, int64_t keys, int64_t k0, const LaneInt<T>* visible,
                                                T* col_max, T* col_sum, T* alpha) {
  using V = typename Simd<T, B>::V;
  using I = typename Simd<T, B>::I;
  constexpr int64_t W = Simd<T, B>::kWidth, NV = kTile / W;
  const V minus_inf = V{} - std::numeric_limits<T>::infinity();
  I seen[NV];  // per query lane: the keys it sees, relative to this tile
  if (visible != nullptr) {
#pragma GCC unroll 16
    for (int64_t u = 0; u < NV; ++u) seen[u] = load<I>(visible + u * W) - static_cast<LaneInt<T>>(k0);
  }
  V top[NV];
#pragma GCC unroll 16
  for (int64_t u = 0; u < NV; ++u) top[u] = load<V>(col_max + u * W);
  for (int64_t j = 0; j < keys; ++j) {
#pragma GCC unroll 16
    for (int64_t u = 0; u < NV; ++u) {
      V x = load<V>(st + j * kTile + u * W);
      if (visible != nullptr) x = select(seen[u] > static_cast<LaneInt<T>>(j), x, minus_inf);
      top[u] = x > top[u] ? x : top[u];  // a max instruction; a NaN score is passed over, spreads below
    }
  }
  V sum[NV];
#pragma GCC unroll 16
  for (int64_t u = 0; u < NV; ++u) {
    const V old_max = load<V>(col_max + u * W);
    top[u] = select(top[u] > old_max + kMaxSlack<T>, top[u], old_max);
    const V factor = exp2_lanes<T, B>(old_max - top[u]);  // 0 on the first tile
    store(alpha + u * W, factor);
    store(col_max + u * W, top[u]);
    sum[u] = load<V>(col_sum + u * W) * factor;
  }
  for (int64_t j = 0; j < keys; ++j) {
#pragma GCC unroll 16
    for (int64_t u = 0; u < NV; ++u) {
      V x = load<V>(st + j * kTile + u * W);
      if (visible != nullptr) x = select(seen[u] > static_cast<LaneInt<T>>(j), x, minus_inf);
      const V p = exp2_lanes<T, B>(x - top[u]);
      store(st + j * kTile + u * W, p);
      sum[u] += p;
    }
  }
#pragma GCC unroll 16
  for (int64_t u = 0; u < NV; ++u) store(col_sum + u * W, sum[u]);
}

template <typename T, int B>
GLM_EXT_ALWAYS_INLINE void grad_scores_columns_impl(T* st, T* dpt, int64_t keys, int64_t k0,
                                                    const LaneInt<T>* visible, const T* lse2,
                                                    const T* delta) {
  using V = typename Simd<T, B>::V;
  using I = typename Simd<T, B>::I;
  constexpr int64_t W = Simd<T, B>::kWidth, NV = kTile / W;
  const V minus_inf = V{} - std::numeric_limits<T>::infinity();
  I seen[NV];
  V lse_v[NV], delta_v[NV];
#pragma GCC unroll 16
  for (int64_t u = 0; u < NV; ++u) {
    if (visible != nullptr) seen[u] = load<I>(visible + u * W) - static_cast<LaneInt<T>>(k0);
    lse_v[u] = load<V>(lse2 + u * W);
    delta_v[u] = load<V>(delta + u * W);
  }
  for (int64_t j = 0; j < keys; ++j) {
#pragma GCC unroll 16
    for (int64_t u = 0; u < NV; ++u) {
      V x = load<V>(st + j * kTile + u * W) - lse_v[u];
      if (visible != nullptr) x = select(seen[u] > static_cast<LaneInt<T>>(j), x, minus_inf);
      const V p = exp2_lanes<T, B>(x);
      store(st + j * kTile + u * W, p);
      store(dpt + j * kTile + u * W, p * (load<V>(dpt + j * kTile + u * W) - delta_v[u]));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Row scaling and the transposed query tiles

template <typename T, int B>
GLM_EXT_ALWAYS_INLINE void scale_rows_impl(T* c, int64_t ldc, int64_t m, int64_t n, const T* alpha) {
  using V = typename Simd<T, B>::V;
  constexpr int64_t W = Simd<T, B>::kWidth;
  for (int64_t r = 0; r < m; ++r) {
    if (alpha[r] == T(1)) continue;
    for (int64_t col = 0; col < n; col += W) store(c + r * ldc + col, load<V>(c + r * ldc + col) * alpha[r]);
  }
}

// One stage of the transpose of a W x W block held as W row vectors: for the rows i without bit H
// and their partners i + H, the H x H sub-blocks off the diagonal are swapped (row i takes lanes
// l + H of its partner where lane l has bit H; the partner takes lanes l - H of row i where it
// does not). Shuffle indices of W and more name the lanes of the second vector.
template <int64_t H, bool kPartner, typename T, typename V, size_t... L>
GLM_EXT_ALWAYS_INLINE V swap_sub_blocks(V row, V partner, std::index_sequence<L...>) {
  constexpr int64_t W = sizeof...(L);
#if defined(__clang__)
  return __builtin_shufflevector(row, partner,
                                 (kPartner ? ((L & H) ? W + L : L + H) : ((L & H) ? W + L - H : L))...);
#else
  using I = typename Simd<T, sizeof(V)>::I;
  return __builtin_shuffle(
      row, partner, I{static_cast<LaneInt<T>>(kPartner ? ((L & H) ? W + L : L + H) : ((L & H) ? W + L - H : L))...});
#endif
}

// Stages H, H / 2, ..., 1: after all of them (H = W / 2 first) row c holds column c.
template <typename T, int64_t H, typename V, int64_t W>
GLM_EXT_ALWAYS_INLINE void transpose_stages(V (&block)[W]) {
  if constexpr (H >= 1) {
#pragma GCC unroll 16
    for (int64_t i = 0; i < W; ++i) {
      if (i & H) continue;
      const V row = block[i], partner = block[i + H];
      block[i] = swap_sub_blocks<H, false, T>(row, partner, std::make_index_sequence<W>{});
      block[i + H] = swap_sub_blocks<H, true, T>(row, partner, std::make_index_sequence<W>{});
    }
    transpose_stages<T, H / 2>(block);
  }
}

// Blocks of W x W: W source rows loaded as vectors (zeros past `rows` and `dim`), scaled, transposed
// in registers by log2(W) stages of shuffles and stored as W destination rows.
template <typename T, int B>
GLM_EXT_ALWAYS_INLINE void transpose_impl(const T* src, int64_t ld, int64_t rows, int64_t dim, T scale, T* dst) {
  using V = typename Simd<T, B>::V;
  constexpr int64_t W = Simd<T, B>::kWidth;
  for (int64_t r0 = 0; r0 < kTile; r0 += W) {
    for (int64_t c0 = 0; c0 < dim; c0 += W) {
      V block[W];
#pragma GCC unroll 16
      for (int64_t i = 0; i < W; ++i) {
        V row{};
        if (r0 + i < rows) {
          const T* s = src + (r0 + i) * ld + c0;
          if (c0 + W <= dim) {
            row = load<V>(s);
          } else {
            for (int64_t l = 0; c0 + l < dim; ++l) row[l] = s[l];
          }
        }
        block[i] = row * scale;
      }
      transpose_stages<T, W / 2>(block);
#pragma GCC unroll 16
      for (int64_t c = 0; c < W && c0 + c < dim; ++c) store(dst + (c0 + c) * kTile + r0, block[c]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
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
  ATTRIBUTES void NAME##_softmax_columns(T* st, int64_t keys, int64_t k0, const LaneInt<T>* visible,  \
                                         T* col_max, T* col_sum, T* alpha) {                         \
    softmax_columns_impl<T, BYTES>(st, keys, k0, visible, col_max, col_sum, alpha);                  \
  }                                                                                                  \
  template <typename T>                                                                              \
  ATTRIBUTES void NAME##_grad_scores_columns(T* st, T* dpt, int64_t keys, int64_t k0,                \
                                             const LaneInt<T>* visible, const T* lse2,               \
                                             const T* delta) {                                       \
    grad_scores_columns_impl<T, BYTES>(st, dpt, keys, k0, visible, lse2, delta);                     \
  }                                                                                                  \
  template <typename T>                                                                              \
  ATTRIBUTES void NAME##_scale_rows(T* c, int64_t ldc, int64_t m, int64_t n, const T* alpha) {       \
    scale_rows_impl<T, BYTES>(c, ldc, m, n, alpha);                                                  \
  }                                                                                                  \
  template <typename T>                                                                              \
  ATTRIBUTES void NAME##_transpose(const T* src, int64_t ld, int64_t rows, int64_t dim, T scale,     \
                                   T* dst) {                                                         \
    transpose_impl<T, BYTES>(src, ld, rows, dim, scale, dst);                                        \
  }                                                                                                  \
  template <typename T>                                                                              \
  TileKernels<T> NAME##_kernels() {                                                                  \
    return {&NAME##_gemm_set<T>,         &NAME##_gemm_add<T>,   &NAME##_gemm_add_ta<T>,              \
            &NAME##_softmax_columns<T>,  &NAME##_grad_scores_columns<T>, &NAME##_scale_rows<T>,       \
            &NAME##_transpose<T>};                                                                   \
  }

// Baseline: 16-byte vectors (SSE2 on x86-64, NEON on arm64), 4 rows x 2 vectors.
GLM_EXT_DEFINE_TILE_KERNELS(baseline, , 16, 4, 2)
#if GLM_EXT_X86_KERNELS
// 16 ymm registers: 4 rows x 2 vectors of accumulators; 32 zmm registers: 6 rows x 4 vectors (5-8%
// faster than 4 x 4 on 64 x 64 tiles: fewer loads of b and of c per multiply-add).
GLM_EXT_DEFINE_TILE_KERNELS(avx2, GLM_EXT_AVX2, 32, 4, 2)
GLM_EXT_DEFINE_TILE_KERNELS(avx512, GLM_EXT_AVX512, 64, 6, 4)
#endif
#undef GLM_EXT_DEFINE_TILE_KERNELS

}  // namespace

template <typename T>
const TileKernels<T>& tile_kernels() {
  static const TileKernels<T> kernels = [] {
#if GLM_EXT_X86_KERNELS
    switch (cpu_isa()) {
      case CpuIsa::kAvx512: return avx512_kernels<T>();
      case CpuIsa::kAvx2: return avx2_kernels<T>();
      case CpuIsa::kBaseline: break;
    }
#endif
    return baseline_kernels<T>();
  }();
  return kernels;
}

template const TileKernels<float>& tile_kernels<float>();
template const TileKernels<double>& tile_kernels<double>();

}  // namespace glm_ext::attention_cpu
