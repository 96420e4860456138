// CUDA entry points of rotary_2d and its backward: the kernel of rotary_2d_kernel.cuh launched with
// the widest vector the input allows, over a grid that fills the current GPU.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>

#include "common/cuda/launch_utils.cuh"
#include "position/cuda/rotary_2d_kernel.cuh"

namespace glm_ext {
namespace {

// sin_sign = -1 gives the inverse rotation (the backward).
at::Tensor rotary_2d_impl(const at::Tensor& x, const at::Tensor& position_ids,
                          const at::Tensor& block_position_ids, double base, const char* x_name,
                          double sin_sign) {
  const Rotary2dArgs args = check_rotary_2d_inputs(x, position_ids, block_position_ids, base, x_name);
  c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (out.numel() == 0) return out;
  const auto* props = at::cuda::getCurrentDeviceProperties();
  const int64_t resident_threads = int64_t{props->multiProcessorCount} * props->maxThreadsPerMultiProcessor;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rotary_2d_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;
    cuda::rotary::with_vector_width<scalar_t>(cuda::rotary::vector_width<scalar_t>(args), [&]<int VEC>() {
      const auto g = cuda::rotary::geometry(args, VEC, resident_threads);
      const auto grid = static_cast<unsigned>(std::min(
          cuda::ceil_div(cuda::rotary::work_units(g, VEC), cuda::kThreadsPerBlock), cuda::max_grid_blocks()));
      cuda::rotary::rotary_2d_kernel<scalar_t, VEC>
          <<<grid, cuda::kThreadsPerBlock, 0, at::cuda::getCurrentCUDAStream()>>>(
              args.x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
              args.position_ids.const_data_ptr<int64_t>(), args.block_position_ids.const_data_ptr<int64_t>(), g,
              static_cast<acc_t>(base), static_cast<acc_t>(sin_sign));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

at::Tensor rotary_2d_cuda(const at::Tensor& x, const at::Tensor& position_ids,
                          const at::Tensor& block_position_ids, double base) {
  return rotary_2d_impl(x, position_ids, block_position_ids, base, "x", /*sin_sign=*/1.0);
}

at::Tensor rotary_2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& position_ids,
                                   const at::Tensor& block_position_ids, double base) {
  return rotary_2d_impl(grad_output, position_ids, block_position_ids, base, "grad_output", /*sin_sign=*/-1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(glm_ext, CUDA, m) {
  m.impl("rotary_2d", &rotary_2d_cuda);
  m.impl("rotary_2d_backward", &rotary_2d_backward_cuda);
}

}  // namespace glm_ext
