// What the CPU forward and backward drivers of mixed_mask_attention share: the mask as key
// counts, the rows and transposed tiles the products read and products that skip masked pairs
// (their work goes over threads with common/parallel.h).
//
// Query i of a sample sees the keys [0, visible_keys(i)) (GLM_SPEC section 2), a count that never
// decreases with i. So within a tile, every query sees a prefix of the keys and every key is seen
// by a suffix of the queries; key tiles at or beyond the count of a block's last query are never
// visited, and a tile whose first query sees all of its keys needs no mask at all.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention/attention.h"
#include "attention/cpu/tile_kernels.h"
#include "common/parallel.h"

namespace glm_ext::attention_cpu {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Keys [0, visible) seen by query `row` of a sample: j < sep or j <= its position.
inline int64_t visible_keys(const MixedMaskSample& s, int64_t row) {
  return std::min(s.len_k, std::max(s.sep, s.len_k - s.len_q + row + 1));
}

// The first query of a sample that sees key `key`: every query when the key is in Part A.
inline int64_t first_query_seeing(const MixedMaskSample& s, int64_t key) {
  return key < s.sep ? 0 : std::max<int64_t>(0, key - (s.len_k - s.len_q));
}

// ---------------------------------------------------------------------------------------------
// What the products read

// The buffers the tile products read and write start on a 64-byte boundary: a vector load that
// straddles two cache lines (malloc aligns to 16 bytes) costs the products about a tenth of their
// speed. A plain vector (untouched pages stay unused, as with any malloc) with kAlignSlack elements
// more than it holds, from its first 64-byte boundary on.
template <typename T>
constexpr int64_t kAlignSlack = 64 / sizeof(T);

template <typename T>
T* aligned_data(std::vector<T>& buffer) {
  const auto address = reinterpret_cast<std::uintptr_t>(buffer.data());
  return buffer.data() + (-address % 64) / sizeof(T);
}

// buffer set to n zeros (and the slack): the first of them.
template <typename T>
T* aligned_zeros(std::vector<T>& buffer, int64_t n) {
  buffer.assign(n + kAlignSlack<T>, T(0));
  return aligned_data(buffer);
}

// Asks for rows [first, last) of `src` (`stride` elements apart, `dim` used) to be brought into L2
// (kWrite: rows about to be written), so that the item a thread runs next finds its strided rows
// there instead of waiting for memory row by row.
template <bool kWrite, typename scalar_t>
void prefetch_rows(const scalar_t* src, int64_t stride, int64_t first, int64_t last, int64_t dim) {
  for (int64_t r = first; r < last; ++r) {
    const auto begin = reinterpret_cast<std::uintptr_t>(src + r * stride);
    const auto end = reinterpret_cast<std::uintptr_t>(src + r * stride + dim);
    for (std::uintptr_t line = begin & ~std::uintptr_t{63}; line < end; line += 64) {
      __builtin_prefetch(reinterpret_cast<const void*>(line), kWrite, 2);
    }
  }
}

// dst[r * ld + d] = src[r * stride + d] for r < rows, d < dim (the padding columns of dst are
// left as they are). Rows of the same type are copied by memcpy, whose vector width is the CPU's
// (this file is compiled for the baseline).
template <typename T, typename scalar_t>
void load_rows(const scalar_t* src, int64_t stride, int64_t rows, int64_t dim, T* dst, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* s = src + r * stride;
    T* d = dst + r * ld;
    if constexpr (std::is_same_v<T, scalar_t>) {
      std::memcpy(d, s, dim * sizeof(T));
    } else {
      for (int64_t c = 0; c < dim; ++c) d[c] = static_cast<T>(s[c]);
    }
  }
}

// The rows [rows, dp] of one head of one sample of q, k, v or grad_out, converted to the
// accumulation type and padded with zeros, reused while the head stays the same and copied only as
// far as they are asked for (the blocks of a head ask for more keys as their queries go on). A copy
// even for float32 inputs: rows 2^k bytes apart in the input (heads x head_dim of them) share a few
// L1 sets and would be evicted while a product reads them again.
template <typename T>
class HeadRows {
 public:
  // Room for max_rows rows is reserved (not touched) up front: growing never reallocates.
  HeadRows(int64_t dim, int64_t max_rows) : dim_(dim), dp_(padded_head_dim<T>(dim)) {
    rows_.reserve(max_rows * dp_ + kAlignSlack<T>);
    first_ = aligned_data(rows_) - rows_.data();
  }

  // Makes rows [0, rows <= max_rows) of (sample, head) available; src points at row 0.
  template <typename scalar_t>
  void load(int64_t sample, int64_t head, const scalar_t* src, int64_t stride, int64_t rows) {
    if (sample != sample_ || head != head_) {
      sample_ = sample;
      head_ = head;
      loaded_ = 0;
    }
    if (rows <= loaded_) return;
    // Grown with zeros, written only in the columns [0, dim): the padding columns stay zero.
    if (static_cast<int64_t>(rows_.size()) < first_ + rows * dp_) rows_.resize(first_ + rows * dp_, T(0));
    load_rows(src + loaded_ * stride, stride, rows - loaded_, dim_, rows_.data() + first_ + loaded_ * dp_, dp_);
    loaded_ = rows;
  }
  // The first row load(sample, head, ...) would copy now: rows before it are already here.
  int64_t first_to_load(int64_t sample, int64_t head) const {
    return sample == sample_ && head == head_ ? loaded_ : 0;
  }
  const T* row(int64_t r) const { return rows_.data() + first_ + r * dp_; }

 private:
  int64_t dim_, dp_, first_;  // row 0 is rows_[first_], on a 64-byte boundary
  int64_t sample_ = -1, head_ = -1, loaded_ = 0;
  std::vector<T> rows_;
};

// ---------------------------------------------------------------------------------------------
// Products over the visible pairs only

// c[r] += sum over j in [lo_r, hi_r) of A(r, j) b[j], for the rows r < m of a tile, where A(r, j)
// is a[r * lda + j] (kTransposed: a[j * lda + r]) and range(r) = (lo_r, hi_r) never decreases in
// either bound. Masked pairs are skipped rather than weighted by their zero probability: 0 * NaN
// is NaN, so a NaN or infinity in a row would otherwise reach rows that never see it. Groups of 4
// rows take their common range in one blocked product and the few pairs outside it row by row.
template <bool kTransposed, typename T, typename Gemm, typename Range>
void add_product_over_ranges(Gemm gemm, const T* a, int64_t lda, const T* b, int64_t ldb, T* c,
                             int64_t ldc, int64_t m, int64_t n, Range range) {
  constexpr int64_t kGroup = 4;
  auto add_row = [&](int64_t r, int64_t lo, int64_t hi) {
    if (lo >= hi) return;
    const T* a_rj = kTransposed ? a + lo * lda + r : a + r * lda + lo;
    gemm(a_rj, lda, b + lo * ldb, ldb, c + r * ldc, ldc, 1, hi - lo, n);
  };
  int64_t r = 0;
  for (; r + kGroup <= m; r += kGroup) {
    const int64_t lo = range(r + kGroup - 1).first, hi = range(r).second;  // common to the group
    if (lo < hi) {
      const T* a_rj = kTransposed ? a + lo * lda + r : a + r * lda + lo;
      gemm(a_rj, lda, b + lo * ldb, ldb, c + r * ldc, ldc, kGroup, hi - lo, n);
    }
    for (int64_t i = r; i < r + kGroup; ++i) {
      const auto [lo_i, hi_i] = range(i);
      if (lo < hi) {
        add_row(i, lo_i, lo);
        add_row(i, hi, hi_i);
      } else {
        add_row(i, lo_i, hi_i);
      }
    }
  }
  for (; r < m; ++r) {
    const auto [lo_r, hi_r] = range(r);
    add_row(r, lo_r, hi_r);
  }
}

}  // namespace glm_ext::attention_cpu
