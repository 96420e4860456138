// CPU versions of the instructions of csrc/attention/cuda/flash_primitives.cuh, written from
// the PTX ISA's definitions (mma.m16n8k16 fragment layouts, ldmatrix, cp.async groups) rather
// than from the kernels' own index code, so that a kernel whose operands are laid out wrongly
// computes wrong numbers here too. Included inside namespace glm_ext::cuda::flash by
// flash_primitives.cuh when GLM_EXT_FLASH_EMULATION names this file; needs cuda_on_cpu.h first.

// The 16-bit element of a b32 register pair: low half first.
inline float half_bits_to_float(uint16_t bits) {
  __half_raw raw;
  raw.x = bits;
  return __half2float(__half(raw));
}
inline float bfloat16_bits_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &widened, 4);
  return f;
}

struct MmaOperands {
  FragA a;
  FragB b;
  FragC c;
};

// D = A B + C for a 16 x 16 A (row-major) and a 16 x 8 B, with g = lane / 4, c = lane % 4:
// A registers {(g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..)}; B {(k 2c..2c+1, n g),
// (k 2c+8.., n g)}; C/D {(g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1)}.
template <float (*ToFloat)(uint16_t)>
inline void emulated_mma(FragC& d, const FragA& a, const FragB& b) {
  const MmaOperands mine{a, b, d};
  d = ::emu::warp_collective(mine, [](const MmaOperands* lanes, int lane) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, c = l % 4;
      const auto& op = lanes[l];
      const int a_rows[4] = {g, g + 8, g, g + 8}, a_cols[4] = {2 * c, 2 * c, 2 * c + 8, 2 * c + 8};
      for (int r = 0; r < 4; ++r) {
        A[a_rows[r]][a_cols[r]] = ToFloat(op.a.x[r] & 0xffff);
        A[a_rows[r]][a_cols[r] + 1] = ToFloat(op.a.x[r] >> 16);
      }
      for (int r = 0; r < 2; ++r) {
        B[2 * c + 8 * r][g] = ToFloat(op.b.x[r] & 0xffff);
        B[2 * c + 8 * r + 1][g] = ToFloat(op.b.x[r] >> 16);
      }
      C[g][2 * c] = op.c.x[0];
      C[g][2 * c + 1] = op.c.x[1];
      C[g + 8][2 * c] = op.c.x[2];
      C[g + 8][2 * c + 1] = op.c.x[3];
    }
    const int g = lane / 4, c = lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * c, 2 * c + 1, 2 * c, 2 * c + 1};
    FragC out;
    for (int r = 0; r < 4; ++r) {
      double sum = C[rows[r]][cols[r]];
      for (int k = 0; k < 16; ++k) sum += static_cast<double>(A[rows[r]][k]) * B[k][cols[r]];
      out.x[r] = static_cast<float>(sum);
    }
    return out;
  });
}

inline void mma_f16(FragC& d, const FragA& a, const FragB& b) { emulated_mma<half_bits_to_float>(d, a, b); }
inline void mma_bf16(FragC& d, const FragA& a, const FragB& b) { emulated_mma<bfloat16_bits_to_float>(d, a, b); }

// ldmatrix .x4: lanes 8i .. 8i + 7 give the rows of matrix i (8 elements of 16 bits each).
// Without .trans lane l receives (row l / 4, columns 2 (l % 4), + 1) of each matrix; with .trans
// (rows 2 (l % 4), + 1; column l / 4).
template <bool Transposed>
inline void emulated_ldmatrix(uint32_t (&r)[4], const void* row) {
  ::emu::check_shared(row, 16, "ldmatrix");
  const auto* mine = static_cast<const uint16_t*>(row);
  struct Result {
    uint32_t x[4];
  };
  const Result result = ::emu::warp_collective(mine, [](const uint16_t* const* rows, int lane) {
    Result out;
    for (int i = 0; i < 4; ++i) {
      const uint16_t* const* matrix = rows + 8 * i;
      uint16_t lo, hi;
      if (Transposed) {
        lo = matrix[2 * (lane % 4)][lane / 4];
        hi = matrix[2 * (lane % 4) + 1][lane / 4];
      } else {
        lo = matrix[lane / 4][2 * (lane % 4)];
        hi = matrix[lane / 4][2 * (lane % 4) + 1];
      }
      out.x[i] = lo | (static_cast<uint32_t>(hi) << 16);
    }
    return out;
  });
  for (int i = 0; i < 4; ++i) r[i] = result.x[i];
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emulated_ldmatrix<false>(r, row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { emulated_ldmatrix<true>(r, row); }

inline void cp_async_16(void* dst, const void* src, bool copy) {
  ::emu::check_shared(dst, 16, "cp.async");
  ::emu::PendingCopy pending{dst, {}};
  if (copy) std::memcpy(pending.bytes, src, 16);
  if (::emu::deferred_copies()) {
    ::emu::self().open_group.push_back(pending);
  } else {
    std::memcpy(dst, pending.bytes, 16);
  }
}

inline void cp_async_commit() {
  auto& f = ::emu::self();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

template <int N>
inline void cp_async_wait() {
  auto& f = ::emu::self();
  while (f.committed.size() > static_cast<size_t>(N)) {
    for (const auto& copy : f.committed.front()) std::memcpy(copy.dst, copy.bytes, 16);
    f.committed.erase(f.committed.begin());
  }
}
