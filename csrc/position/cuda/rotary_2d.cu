// CUDA kernel of rotary_2d (ChatGLM-6B style 2D rotary embedding) and its backward, the inverse
// rotation. The math is glm_ext/reference.py's rotary_2d; validation is shared with the CPU kernel
// (position_ops.h).
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/cuda/launch_utils.cuh"
#include "position/position_ops.h"

namespace glm_ext {
namespace {

using cuda::ceil_div;
using cuda::kThreadsPerBlock;
using cuda::max_grid_blocks;
using cuda::Vec;

// Each thread rotates at least this many heads with one set of cos/sin (when there are that many),
// so the accurate sincos is amortised; below that, heads are split over threads for parallelism.
constexpr int64_t kMinHeadsPerThread = 4;

__device__ __forceinline__ void sin_cos(float angle, float* s, float* c) { sincosf(angle, s, c); }
__device__ __forceinline__ void sin_cos(double angle, double* s, double* c) { sincos(angle, s, c); }

// Where a thread's work lies. A unit is (token, head group, vector of VEC consecutive pairs in
// one half); units are numbered with the pair vector fastest, so a warp reads whole head rows.
struct RotaryGeometry {
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
                     const int64_t* __restrict__ block_position_ids, RotaryGeometry g,
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

// Launches with the widest vector of at most 16 bytes that every access allows: VEC must divide
// the pairs per half (so vectors never straddle a half), the input's strides and its alignment
// (the output is fresh and contiguous, hence aligned whenever the input's geometry is).
template <typename scalar_t, int VEC = 16 / sizeof(scalar_t)>
void launch_rotary_2d(const at::Tensor& x, at::Tensor& out, const Rotary2dArgs& args, double base,
                      double sin_sign) {
  if constexpr (VEC > 1) {
    // A dimension of size one never advances its stride, so its stride does not matter.
    auto stride_fits = [](int64_t size, int64_t stride) { return size == 1 || stride % VEC == 0; };
    const bool fits =
        (args.head_dim / 4) % VEC == 0 &&
        reinterpret_cast<uintptr_t>(x.const_data_ptr()) % (VEC * sizeof(scalar_t)) == 0 &&
        stride_fits(args.batch, args.x_strides.batch) && stride_fits(args.seq, args.x_strides.token) &&
        stride_fits(args.heads, args.x_strides.head);
    if (!fits) return launch_rotary_2d<scalar_t, VEC / 2>(x, out, args, base, sin_sign);
  }
  using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
  RotaryGeometry g;
  g.tokens = args.batch * args.seq;
  g.seq = args.seq;
  g.heads = args.heads;
  g.head_dim = args.head_dim;
  g.x_strides = args.x_strides;
  // Heads are split into groups only as far as needed to fill the GPU with threads.
  const int64_t units_per_group = g.tokens * (args.head_dim / 2) / VEC;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t resident_threads =
      int64_t{props->multiProcessorCount} * props->maxThreadsPerMultiProcessor;
  const int64_t groups = std::clamp<int64_t>(resident_threads / units_per_group, 1,
                                             ceil_div(args.heads, kMinHeadsPerThread));
  g.heads_per_group = ceil_div(args.heads, groups);
  g.num_groups = ceil_div(args.heads, g.heads_per_group);

  const int64_t units = units_per_group * g.num_groups;
  const auto grid = static_cast<unsigned>(std::min(ceil_div(units, kThreadsPerBlock), max_grid_blocks()));
  rotary_2d_kernel<scalar_t, VEC><<<grid, kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
      x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
      args.position_ids.const_data_ptr<int64_t>(),
      args.block_position_ids.const_data_ptr<int64_t>(), g, static_cast<acc_t>(base),
      static_cast<acc_t>(sin_sign));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rotary_2d_impl(const at::Tensor& x, const at::Tensor& position_ids,
                          const at::Tensor& block_position_ids, double base, const char* x_name,
                          double sin_sign) {
  const Rotary2dArgs args = check_rotary_2d_inputs(x, position_ids, block_position_ids, base, x_name);
  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_2d_cuda", [&] {
    launch_rotary_2d<scalar_t>(args.x, out, args, base, sin_sign);
  });
  return out;
}

}  // namespace

at::Tensor rotary_2d_cuda(const at::Tensor& x, const at::Tensor& position_ids,
                          const at::Tensor& block_position_ids, double base) {
  return rotary_2d_impl(x, position_ids, block_position_ids, base, "x", /*sin_sign=*/1.0);
}

at::Tensor rotary_2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& position_ids,
                                   const at::Tensor& block_position_ids, double base) {
  return rotary_2d_impl(grad_output, position_ids, block_position_ids, base, "grad_output",
                        /*sin_sign=*/-1.0);
}

}  // namespace glm_ext

TORCH_LIBRARY_IMPL(glm_ext, CUDA, m) {
  m.impl("rotary_2d", &glm_ext::rotary_2d_cuda);
  m.impl("rotary_2d_backward", &glm_ext::rotary_2d_backward_cuda);
}
