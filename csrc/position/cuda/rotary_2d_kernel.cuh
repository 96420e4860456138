// The CUDA kernel of rotary_2d (ChatGLM-6B style 2D rotary embedding) and of its backward, the
// inverse rotation, with the host-side choice of its vector width and grid geometry. No CUDA
// runtime call here: rotary_2d.cu launches it on a GPU, and the tests run the same code on the CPU
// (python_tests/flash_emulator). The math is glm_ext/reference.py's rotary_2d; validation is shared
// with the CPU kernel (position/position_ops.h).
#pragma once

#include <ATen/AccumulateType.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda/vec.cuh"
#include "common/strides.h"
#include "position/position_ops.h"

namespace glm_ext::cuda::rotary {

// Each thread rotates at least this many heads with one set of cos/sin (when there are that many),
// so the accurate sincos is amortised; below that, heads are split over threads for parallelism.
constexpr int64_t kMinHeadsPerThread = 4;

__device__ __forceinline__ void sin_cos(float angle, float* s, float* c) { sincosf(angle, s, c); }
__device__ __forceinline__ void sin_cos(double angle, double* s, double* c) { sincos(angle, s, c); }

// Where a thread's work lies. A unit is (token, head group, vector of VEC consecutive pairs in
// one half); units are numbered with the pair vector fastest, so a warp reads whole head rows.
struct Geometry {
  int64_t tokens, seq, heads, head_dim;
  TokenStrides x_strides;  // of the input
  int64_t heads_per_group, num_groups;
};

// out[j] = a cos - b sin, out[j + Q] = b cos + a sin for the pairs (j, j + Q) of each half, with
// Q = head_dim / 4; the first half turns by the position id, the second by the block-position
// id. sin_sign = -1 gives the inverse rotation (the backward).
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreadsPerBlock)
    rotary_2d_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                     const int64_t* __restrict__ position_ids,
                     const int64_t* __restrict__ block_position_ids, Geometry g,
                     at::acc_type<scalar_t, /*is_cuda=*/true> base,
                     at::acc_type<scalar_t, /*is_cuda=*/true> sin_sign) {
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  using vec_t = Vec<scalar_t, VEC>;
  const int64_t quarter = g.head_dim / 4;  // pairs per half
  const int64_t rot_dim = 2 * quarter;     // size of a half
  const int64_t vecs_per_half = quarter / VEC;
  const int64_t num_units = g.tokens * g.num_groups * 2 * vecs_per_half;

  for (int64_t unit = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; unit < num_units;
       unit += int64_t{gridDim.x} * blockDim.x) {
    const int64_t pair_vec = unit % (2 * vecs_per_half);
    const int64_t rest = unit / (2 * vecs_per_half);
    const int64_t group = rest % g.num_groups;
    const int64_t token = rest / g.num_groups;
    const int64_t half = pair_vec / vecs_per_half;
    const int64_t j0 = (pair_vec % vecs_per_half) * VEC;

    // One cos/sin per pair, shared by all heads of the group.
    const int64_t id = half == 0 ? position_ids[token] : block_position_ids[token];
    acc_t cos_v[VEC];
    acc_t sin_v[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const acc_t angle = static_cast<acc_t>(id) * rotary_inv_freq<acc_t>(j0 + k, rot_dim, base);
      sin_cos(angle, &sin_v[k], &cos_v[k]);
      sin_v[k] *= sin_sign;
    }

    const int64_t b = token / g.seq;
    const int64_t s = token % g.seq;
    const int64_t offset = half * rot_dim + j0;
    const scalar_t* in_token = x + g.x_strides.offset(b, s, 0) + offset;
    scalar_t* out_token = out + token * g.heads * g.head_dim + offset;
    const int64_t head_end = std::min(g.heads, (group + 1) * g.heads_per_group);
#pragma unroll 4
    for (int64_t h = group * g.heads_per_group; h < head_end; ++h) {
      const scalar_t* in_head = in_token + h * g.x_strides.head;
      scalar_t* out_head = out_token + h * g.head_dim;
      const vec_t a = *reinterpret_cast<const vec_t*>(in_head);
      const vec_t c = *reinterpret_cast<const vec_t*>(in_head + quarter);
      vec_t ra;
      vec_t rc;
#pragma unroll
      for (int k = 0; k < VEC; ++k) {
        const acc_t av = static_cast<acc_t>(a.val[k]);
        const acc_t cv = static_cast<acc_t>(c.val[k]);
        ra.val[k] = static_cast<scalar_t>(av * cos_v[k] - cv * sin_v[k]);
        rc.val[k] = static_cast<scalar_t>(cv * cos_v[k] + av * sin_v[k]);
      }
      *reinterpret_cast<vec_t*>(out_head) = ra;
      *reinterpret_cast<vec_t*>(out_head + quarter) = rc;
    }
  }
}

// The widest vector of at most 16 bytes that every access allows: it must divide the pairs per
// half (so vectors never straddle a half), the input's strides and its alignment (the output is
// fresh and contiguous, hence aligned whenever the input's geometry is).
template <typename scalar_t>
int vector_width(const Rotary2dArgs& args) {
  for (int vec = 16 / sizeof(scalar_t); vec > 1; vec /= 2) {
    // A dimension of size one never advances its stride, so its stride does not matter.
    auto stride_fits = [&](int64_t size, int64_t stride) { return size == 1 || stride % vec == 0; };
    if ((args.head_dim / 4) % vec == 0 &&
        reinterpret_cast<uintptr_t>(args.x.const_data_ptr()) % (vec * sizeof(scalar_t)) == 0 &&
        stride_fits(args.batch, args.x_strides.batch) && stride_fits(args.seq, args.x_strides.token) &&
        stride_fits(args.heads, args.x_strides.head)) {
      return vec;
    }
  }
  return 1;
}

// Calls f.template operator()<VEC>() with VEC == vec (a power of two up to 16 bytes).
template <typename scalar_t, int VEC = 16 / sizeof(scalar_t), typename F>
void with_vector_width(int vec, F&& f) {
  if constexpr (VEC > 1) {
    if (vec < VEC) return with_vector_width<scalar_t, VEC / 2>(vec, f);
  }
  f.template operator()<VEC>();
}

// The geometry of a call on a device that holds resident_threads threads at once: heads are split
// into groups only as far as needed to fill it.
inline Geometry geometry(const Rotary2dArgs& args, int vec, int64_t resident_threads) {
  Geometry g;
  g.tokens = args.batch * args.seq;
  g.seq = args.seq;
  g.heads = args.heads;
  g.head_dim = args.head_dim;
  g.x_strides = args.x_strides;
  const int64_t units_per_group = g.tokens * (args.head_dim / 2) / vec;
  const int64_t groups = std::clamp<int64_t>(resident_threads / std::max<int64_t>(units_per_group, 1), 1,
                                             ceil_div(args.heads, kMinHeadsPerThread));
  g.heads_per_group = ceil_div(args.heads, groups);
  g.num_groups = ceil_div(args.heads, g.heads_per_group);
  return g;
}

// The threads' work units of a call (one per thread and grid-stride step).
inline int64_t work_units(const Geometry& g, int vec) { return g.tokens * g.num_groups * (g.head_dim / 2) / vec; }

}  // namespace glm_ext::cuda::rotary
